"""The 2020 study's PyTorch training step, timed on the CPU as a reference.

    python experiments/torch_reference.py [--batch_size=128 --anchors=0,3 \
        --steps=5 --warmup=2 --repeats=3 --threads=<cores>]

A ResNet32 with option-A shortcuts (464,154 parameters for 10 classes, like
`landscape_jax.models.ResNet` of depth 32) is trained in eager mode with
``torch.optim.SGD(lr=0.01, momentum=0.9, weight_decay=1e-3)`` on one random,
already normalized batch. The anchor penalty is computed the study's way
(section 3.1.3 of the study): for each anchor a Python loop over the parameter
tensors sums the squared differences, and ``strength / C · exp(−d / width)`` is
added to the loss once per anchor. Unlike the JAX step, the timed step does not
gather, augment or normalize its batch (the study did that in data-loader
workers).

Each anchor count prints one JSON line with the keys of ``landscape_jax.bench``
(``framework`` is ``torch``). Needs torch (``pip install torch``; the CPU build
is enough), which the package does not depend on.
"""

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional

# ResNet32: (channels, first-block stride) per stage, five basic blocks each.
STAGES = ((16, 1), (32, 2), (64, 2))
BLOCKS_PER_STAGE = 5
NUM_PARAMETERS = 464_154

# The study's optimizer and penalty (configs/baseline.py).
LEARNING_RATE = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-3
STRENGTH = 1.0
WIDTH = 1000.0

# Spread of the random anchors around the parameters.
_ANCHOR_NOISE = 0.01


class BasicBlock(nn.Module):
    """conv3x3-BN-relu-conv3x3-BN plus the option-A shortcut, then relu."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.stride = stride
        self.added_channels = channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = functional.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.stride != 1 or self.added_channels:
            # Subsample and zero-pad the channels, half before and half after.
            x = x[:, :, :: self.stride, :: self.stride]
            before = self.added_channels // 2
            x = functional.pad(x, (0, 0, 0, 0, before, self.added_channels - before))
        return functional.relu(x + y)


class ResNet32(nn.Module):
    """ResNet32 for CIFAR (He et al. 2016) with option-A shortcuts."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem_conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        blocks = []
        channels_in = 16
        for channels, first_stride in STAGES:
            for block in range(BLOCKS_PER_STAGE):
                stride = first_stride if block == 0 else 1
                blocks.append(BasicBlock(channels_in, channels, stride))
                channels_in = channels
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(channels_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = functional.relu(self.stem_bn(self.stem_conv(x)))
        x = self.blocks(x)
        return self.classifier(x.mean(dim=(2, 3)))


def compute_distance(anchor: Sequence[torch.Tensor], model: nn.Module) -> torch.Tensor:
    """The study's squared L2 distance: a Python loop over parameter tensors."""
    distance = 0
    for anchor_param, param in zip(anchor, model.parameters(), strict=True):
        difference = torch.add(-param, anchor_param)
        distance += torch.sum(torch.mul(difference, difference))
    return distance


def loss_with_anchors(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    anchors: Sequence[Sequence[torch.Tensor]],
) -> torch.Tensor:
    """Cross-entropy plus ``STRENGTH / C · exp(−d_c / WIDTH)`` for each anchor c."""
    loss = functional.cross_entropy(model(images), labels)
    for anchor in anchors:
        kernel = torch.exp(-compute_distance(anchor, model) / WIDTH)
        loss = loss + STRENGTH / len(anchors) * kernel
    return loss


def run_reference(
    batch_size: int,
    anchor_counts: Sequence[int],
    *,
    steps: int = 5,
    warmup: int = 2,
    repeats: int = 3,
    threads: int | None = None,
    image_size: int = 32,
    channels: int = 3,
    num_classes: int = 10,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Times the eager PyTorch step for each anchor count.

    Args:
      batch_size: images per step.
      anchor_counts: anchor counts to time; include 0 for the overhead.
      steps: steps per timed repeat.
      warmup: untimed steps before the first repeat.
      repeats: timed repeats per count, interleaved across counts.
      threads: intra-op threads; None for all cores.
      image_size: height and width of the random images.
      channels: channels of the random images.
      num_classes: classes of the model and the random labels.
      seed: seed of the parameters, anchors and data.

    Returns:
      One dict per anchor count with ``step_ms`` (median), ``step_ms_min``,
      ``images_per_s``, ``cpu_ms`` (process CPU time per step, median) and, for
      counts above 0 when 0 is timed, ``overhead_per_anchor_pct``.
    """
    threads = threads or os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    images = torch.randn(batch_size, channels, image_size, image_size)
    labels = torch.randint(0, num_classes, (batch_size,))

    cases = {}
    for count in anchor_counts:
        torch.manual_seed(seed)
        model = ResNet32(num_classes, channels).train()
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=LEARNING_RATE,
            momentum=MOMENTUM,
            weight_decay=WEIGHT_DECAY,
        )
        anchors = [
            [
                (param + _ANCHOR_NOISE * torch.randn_like(param)).detach()
                for param in model.parameters()
            ]
            for _ in range(count)
        ]
        cases[count] = (model, optimizer, anchors)
        _run(*cases[count], images, labels, warmup)

    load_before = os.getloadavg()[0]
    times = {count: [] for count in anchor_counts}
    cpu_times = {count: [] for count in anchor_counts}
    for _ in range(repeats):
        for count in anchor_counts:
            cpu_start = time.process_time()
            times[count].append(_run(*cases[count], images, labels, steps) / steps)
            cpu_times[count].append((time.process_time() - cpu_start) / steps)
    load_after = os.getloadavg()[0]

    results = []
    for count in anchor_counts:
        step_ms = 1e3 * statistics.median(times[count])
        result = {
            'framework': 'torch',
            'model': 'resnet32',
            'batch_size': batch_size,
            'anchors': count,
            'step_ms': round(step_ms, 3),
            'step_ms_min': round(1e3 * min(times[count]), 3),
            'images_per_s': round(1e3 * batch_size / step_ms, 1),
            'cpu_ms': round(1e3 * statistics.median(cpu_times[count]), 3),
            'device': 'cpu',
            'threads': threads,
            'torch': torch.__version__,
            'image_shape': [image_size, image_size, channels],
            'steps': steps,
            'repeats': repeats,
            'load_avg_1min': [round(load_before, 2), round(load_after, 2)],
        }
        if count > 0 and 0 in times:
            base_ms = 1e3 * statistics.median(times[0])
            result['overhead_per_anchor_pct'] = round(
                (step_ms / base_ms - 1.0) / count * 100.0, 3
            )
        results.append(result)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Parses the command line, times the step and prints JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--anchors', default='0,3')
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--image_size', type=int, default=32)
    parser.add_argument('--channels', type=int, default=3)
    parser.add_argument('--num_classes', type=int, default=10)
    args = parser.parse_args(argv)
    results = run_reference(
        args.batch_size,
        [int(count) for count in args.anchors.split(',') if count],
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        threads=args.threads,
        image_size=args.image_size,
        channels=args.channels,
        num_classes=args.num_classes,
    )
    for result in results:
        print(json.dumps(result), flush=True)


def _run(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    anchors: Sequence[Sequence[torch.Tensor]],
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
) -> float:
    """Runs ``steps`` training steps; returns the seconds they took."""
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_with_anchors(model, images, labels, anchors).backward()
        optimizer.step()
    return time.perf_counter() - start


if __name__ == '__main__':
    main()
