"""The method, free of any one model: the engine's sampling loop (engine.py), the paper's
guidance maths (guidance.py), temporal windows (windows.py), framing (framing.py),
regions (regions.py) and the inversion cache (inversion.py). Everything model-specific
comes from a backbone through the seam of backend/backbones/base.py, the only backbone
module the method imports; which backbone a model is, and loading it, is
backend/backbones/ (registry.py, loading.py) and backend/edit.py's `load_engine`."""
