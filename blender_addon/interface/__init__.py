"""What the editor touches: the operators, the sidebar panel, the preferences and the
panel's settings (the job records are defined here too, as Blender data). It calls the
job flow and the backend; nothing below imports it."""
