"""Tools around the engine: the cost benchmark (bench.py), motion-fidelity evaluation
(evaluate.py, metrics.py, tracking.py) and the demos (demo.py, blender_demo.py)."""
