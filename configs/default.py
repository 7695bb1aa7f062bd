"""The study's base setup: ResNet32 on CIFAR-10, SGD, constant rate, no anchors.

Every other configuration starts from this one and changes a few fields; any field
can also be overridden on the command line, e.g. ``--config.distance.strength=10``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_epochs = 600
    config.batch_size = 128
    # Evaluation only; the last batch is padded, so any size works.
    config.eval_batch_size = 1000
    # Training states kept in WORKDIR/checkpoints (ensemble snapshots are all kept).
    config.checkpoints_to_keep = 2

    config.model = ml_collections.ConfigDict()
    config.model.name = 'resnet32'  # 'resnet32' | 'mobilenetv2'
    # Computation dtype: 'float32', or 'bfloat16' for mixed precision (parameters,
    # the penalty and the optimizer stay in float32).
    config.model.dtype = 'float32'
    # How convolutions are differentiated: 'xla', 'matmul' (weight gradients as
    # matrix products, faster on CPU) or 'auto' ('matmul' on CPU, else 'xla').
    config.model.conv_impl = 'auto'

    config.data = ml_collections.ConfigDict()
    # Any tfds image-classification data set with `image` and `label` features.
    config.data.name = 'cifar10'
    # Where tfds keeps prepared data sets; None: tfds's default, ~/tensorflow_datasets.
    config.data.data_dir = ml_collections.config_dict.placeholder(str)
    # A folder holding the data set's original archive (cifar-10-binary.tar.gz for
    # CIFAR-10), used instead of downloading it; None means download.
    config.data.manual_dir = ml_collections.config_dict.placeholder(str)
    config.data.train_split = 'train'
    config.data.eval_split = 'test'

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 0.01
    config.optimizer.momentum = 0.9
    # L2 regularization as PyTorch's coupled weight decay: weight_decay * θ is added
    # to the gradient of every parameter before the momentum buffer.
    config.optimizer.weight_decay = 1e-3

    config.schedule = ml_collections.ConfigDict()
    config.schedule.name = 'constant'  # 'constant' | 'step' | 'cosine'
    # 'step': the rate is multiplied by decay_rate every decay_epochs and reset to
    # learning_rate every restart_epochs.
    config.schedule.decay_rate = 0.1
    config.schedule.decay_epochs = 50
    config.schedule.restart_epochs = 150
    # 'cosine': cosine decay from learning_rate to end_value over period_epochs,
    # then a warm restart; an ensemble snapshot is saved at the end of each cycle.
    config.schedule.period_epochs = 150
    config.schedule.end_value = 0.0

    config.distance = ml_collections.ConfigDict()
    # s: the height of the Gaussian bump placed on each anchor.
    config.distance.strength = 1.0
    # σ²: its squared width, in units of the squared L2 distance over all
    # trainable parameters.
    config.distance.width = 1000.0
    # At the end of each of these epochs (counted from 1) an ensemble snapshot is
    # saved and the parameters become an anchor. Empty: plain training.
    config.distance.anchor_epochs = ()
    return config
