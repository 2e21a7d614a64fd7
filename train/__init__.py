"""Training of the diffusion view: the frozen backbone's AR view supervises the trainable
diffusion attention (the KL objective of ``train.objective``) on a JAX mesh; see
``docs/architecture.md`` for the modules and ``python -m train.main --help`` for the
command."""
