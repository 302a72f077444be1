from mani_jax.serve.server import serve

serve()
