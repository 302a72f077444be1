"""mani_jax: a JAX/Pallas-first research framework for LLM systems.

Layers (dependency direction never reversed): ``core`` <- ``kernels`` <- ``models`` <- ``train`` /
``inference`` <- ``serve`` / ``export`` / ``voice`` <- ``experiments``.
"""

__version__ = "0.1.0"
