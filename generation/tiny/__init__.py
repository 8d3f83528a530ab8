"""Tiny random-initialised models in exactly the on-disk layout of the real weights.

`manage.py build_test_models DIR` writes every component the methods load, so tests, CI and
the demo run the real loading and inference code on CPU in seconds. Architectures come from
the real classes with small configurations (after diffusers' own test configs); key names and
file names are the real ones. Face analysis is never faked: the ID encoders are built for the
dimension of the active face embedder (128 for the offline dlib default, 512 for ArcFace).
"""
