"""The method, free of any one model: the engine's sampling loop (engine.py), the paper's
guidance maths (guidance.py), temporal windows (windows.py), framing (framing.py) and the
inversion cache (inversion.py). Everything model-specific comes from a backbone
(backend/backbones/)."""
