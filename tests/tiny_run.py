"""The tiny training run the unit tier shares, as ``--set`` overrides: a width-1/8 IResNet-18 at 32 px on the
bundled faces (data/tiny: 240 images of 40 people, 5 steps of 48 per epoch). A test module lists what it
varies after these (later overrides win). Tests take them as the ``tiny_run`` fixture (conftest.py); a module
helper that is not a fixture imports ``TINY_RUN``."""

TINY_RUN = [
    "model.name=iresnet18",
    "model.width=0.125",
    "model.embedding_size=16",
    "data.image_size=32",
    "data.num_workers=0",
    "loss.scale=16",
    "loss.sample_ratio=0.5",
    "optim.lr=0.05",
    "optim.clip_norm=5.0",
    "optim.decay_boundaries=[1]",
    "train.batch_size=48",
    "train.log_interval=1",
]
