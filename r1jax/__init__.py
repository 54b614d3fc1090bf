"""r1jax"""
