"""Backbone networks of the examples and benchmarks, ready to wrap.

`cifar_cnn`: the 4-convolution CIFAR network (32x32x3 images);
`resnet20`: the CIFAR ResNet-20 (a functional residual network);
`digits_cnn`: the quickstart's small network for the 8x8 scikit-learn
digits; `vgg16`: the VGG-16 layout at 224x224, for timing. All end in
logits (no softmax) and are built afresh on each call: under
`keras.utils.set_random_seed`, the same call gives the same weights.
"""

import keras
import numpy as np

# Per-channel mean and standard deviation of the CIFAR-10 training images
# (0-255), used by `cifar_cnn`'s input Normalization layer.
CIFAR_MEAN = (125.3, 123.0, 113.9)
CIFAR_STD = (63.0, 62.1, 66.7)
# VGG-16's five stages: (filters, convolutions) each.
VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def _is_count(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_classes(classes):
    if not _is_count(classes) or classes < 1:
        raise ValueError(
            f"Expected classes to be an int >= 1. Received: classes={classes!r}"
        )


def _check_widths(widths):
    if not len(widths) or any(not _is_count(w) or w < 1 for w in widths):
        raise ValueError(
            "Expected widths to be a non-empty sequence of ints >= 1. "
            f"Received: widths={widths!r}"
        )


def _conv_blocks(model, widths, pool_after, classes):
    """Appends conv-bn-relu blocks to `model`, then the classifier.

    Each block is a 3x3 convolution (same padding, no bias), batch
    normalization and ReLU, followed by 2x2 max pooling when
    `pool_after(index)` is true. The classifier is global average pooling
    and a linear layer of `classes` logits.
    """
    for index, width in enumerate(widths):
        model.add(keras.layers.Conv2D(width, 3, padding="same", use_bias=False))
        model.add(keras.layers.BatchNormalization())
        model.add(keras.layers.ReLU())
        if pool_after(index):
            model.add(keras.layers.MaxPooling2D())
    model.add(keras.layers.GlobalAveragePooling2D())
    model.add(keras.layers.Dense(classes))
    return model


def cifar_cnn(
    classes=10,
    widths=(64, 128, 256, 512),
    pool_first=True,
    normalize=True,
    name="cnn4",
):
    """The CIFAR network: conv-bn-relu blocks, then a linear classifier.

    With the defaults, the network of `examples/cifar.py`: input
    normalization, four blocks each followed by 2x2 max pooling, global
    average pooling and a linear layer. `pool_first=False, normalize=False,
    name="cifar4"` gives the one `benchmarks/speed.py` times (no pooling
    after the first block: four times the FLOPs in the second).

    Args:
        classes: number of classes (logits).
        widths: filters of each convolution.
        pool_first: max-pool after the first block too.
        normalize: begin with a `keras.layers.Normalization` by
            `CIFAR_MEAN` and `CIFAR_STD`, for images in [0, 255].
        name: the model's name.

    Returns:
        A `keras.Sequential` taking 32x32x3 images.
    """
    _check_classes(classes)
    _check_widths(widths)
    model = keras.Sequential([keras.Input((32, 32, 3))], name=name)
    if normalize:
        model.add(
            keras.layers.Normalization(
                mean=CIFAR_MEAN, variance=np.square(CIFAR_STD).tolist()
            )
        )
    return _conv_blocks(
        model, widths, lambda index: pool_first or index > 0, classes
    )


def resnet20(classes=10, widths=(16, 32, 64), blocks=3, normalize=True):
    """The CIFAR ResNet of He et al. (2016), 6n + 2 layers (n = `blocks`;
    3 gives ResNet-20), as a functional model.

    A 3x3 stem convolution, then three stages of `blocks` basic blocks
    (3x3 conv-bn-relu, 3x3 conv-bn, added to the shortcut, then ReLU). The
    first block of the second and third stages halves the map with stride
    2 and widens the stream; its shortcut is a 1x1 strided convolution with
    batch norm (the others are identities). Convolutions have no bias;
    kernels start He-normal.
    Global average pooling and a linear classifier end it.

    Args:
        classes: number of classes (logits).
        widths: the three stages' widths.
        blocks: basic blocks per stage.
        normalize: begin with a `keras.layers.Normalization` by
            `CIFAR_MEAN` and `CIFAR_STD`, for images in [0, 255].

    Returns:
        A functional `keras.Model` taking 32x32x3 images, named
        `"resnet{6 * blocks + 2}"`.
    """
    _check_classes(classes)
    _check_widths(widths)
    if len(widths) != 3 or not _is_count(blocks) or blocks < 1:
        raise ValueError(
            "Expected three stage widths and blocks >= 1. Received: "
            f"widths={widths!r}, blocks={blocks!r}"
        )
    layers = keras.layers

    def conv_bn(x, width, strides=1, size=3):
        x = layers.Conv2D(
            width,
            size,
            strides=strides,
            padding="same",
            use_bias=False,
            kernel_initializer="he_normal",
        )(x)
        return layers.BatchNormalization()(x)

    inputs = keras.Input((32, 32, 3))
    x = inputs
    if normalize:
        x = layers.Normalization(
            mean=CIFAR_MEAN, variance=np.square(CIFAR_STD).tolist()
        )(x)
    x = layers.ReLU()(conv_bn(x, widths[0]))
    for stage, width in enumerate(widths):
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            if strides > 1 or x.shape[-1] != width:
                shortcut = conv_bn(x, width, strides, size=1)
            y = layers.ReLU()(conv_bn(x, width, strides))
            y = conv_bn(y, width)
            x = layers.ReLU()(layers.Add()([shortcut, y]))
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(classes, kernel_initializer="he_normal")(x)
    return keras.Model(inputs, outputs, name=f"resnet{6 * blocks + 2}")


def digits_cnn(input_shape=(8, 8, 1), classes=10, widths=(32, 64, 64)):
    """The quickstart's network: conv-bn-relu blocks (2x2 max pooling
    after the second), then a linear classifier on global average pooling.

    Args:
        input_shape: shape of one image.
        classes: number of classes (logits).
        widths: filters of each convolution.

    Returns:
        A `keras.Sequential` named `"backbone"`.
    """
    _check_classes(classes)
    _check_widths(widths)
    model = keras.Sequential([keras.Input(input_shape)], name="backbone")
    return _conv_blocks(model, widths, lambda index: index == 1, classes)


def vgg16(classes=1000):
    """The VGG-16 layout at 224x224: 13 3x3 convolutions with bias and
    ReLU in five stages, each stage ending in 2x2 max pooling, then three
    dense layers (4096, 4096, `classes` logits). No batch normalization.

    Args:
        classes: number of classes (logits).

    Returns:
        A `keras.Sequential` named `"vgg16"`.
    """
    _check_classes(classes)
    model = keras.Sequential([keras.Input((224, 224, 3))], name="vgg16")
    for width, convolutions in VGG16_STAGES:
        for _ in range(convolutions):
            model.add(
                keras.layers.Conv2D(width, 3, padding="same", activation="relu")
            )
        model.add(keras.layers.MaxPooling2D())
    model.add(keras.layers.Flatten())
    model.add(keras.layers.Dense(4096, activation="relu"))
    model.add(keras.layers.Dense(4096, activation="relu"))
    model.add(keras.layers.Dense(classes))
    return model
