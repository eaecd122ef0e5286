"""The built-in cnn_small written as a plain torch.nn.Module (an independent code path): with
the built-in's initial tensors (model.init_from) it must give the built-in model's scores."""

from torch import nn

from magic_cli.plugins import register_module


class CNNSmallModule(nn.Module):
    def __init__(self, in_channels, n_classes, channels):
        super().__init__()
        blocks, c_in = [], in_channels
        for i, c in enumerate(channels):
            block = nn.Module()
            block.conv = nn.Conv2d(c_in, c, 3, padding=1, bias=False)
            block.bn = nn.BatchNorm2d(c)
            setattr(self, f"block{i}", block)
            blocks.append(block)
            c_in = c
        self.n_blocks = len(channels)
        self.head = nn.Linear(c_in, n_classes)

    def forward(self, x):
        for i in range(self.n_blocks):
            block = getattr(self, f"block{i}")
            x = block.conv(x)
            if i > 0:
                x = nn.functional.avg_pool2d(x, 2)
            x = nn.functional.gelu(block.bn(x))
        return self.head(x.mean((2, 3)))


@register_module("cnn_small_module")
def cnn_small_module(input_shape, n_classes, *, channels: list = (16, 32)):
    return CNNSmallModule(input_shape[0], n_classes, list(channels))
