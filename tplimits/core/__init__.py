"""The framework itself: tracing, the Tensor Program IR, lowering, interpretation.

It knows no particular layer, optimizer or architecture; those come from plugins.
"""
