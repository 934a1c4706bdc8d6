"""A PyTorch twin of fcn_jax's SAME-padding U-Net, timed by scripts/benchmark.py.

Same architecture as `fcn_jax.models.UNet(padding='SAME', norm='batch',
downsample='max_pool', upsample='transposed_conv')`: (3x3 conv without bias,
BatchNorm, ReLU) x 2 per level, 2x2 max-pool, 2x2 stride-2 transposed convs,
skips concatenated [skip, up], 1x1 head. PyTorch is optional: it is not a
dependency of the project, only used here when installed.
"""

import torch
from torch import nn


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    layers = []
    for channels in (in_channels, out_channels):
        layers += [
            nn.Conv2d(channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class TwinUNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, depth: int, base_width: int):
        super().__init__()
        widths = [base_width * 2**level for level in range(depth + 1)]
        self.encoder = nn.ModuleList(
            [_conv_block(in_channels, widths[0])]
            + [_conv_block(widths[i - 1], widths[i]) for i in range(1, depth + 1)]
        )
        self.up = nn.ModuleList(
            [
                nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                for i in range(depth)
            ]
        )
        self.decoder = nn.ModuleList(
            [_conv_block(2 * widths[i], widths[i]) for i in range(depth)]
        )
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, block in enumerate(self.encoder):
            if level > 0:
                x = nn.functional.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for level in reversed(range(len(self.up))):
            x = self.decoder[level](torch.cat([skips[level], self.up[level](x)], dim=1))
        return self.head(x)


def prepare(
    *,
    batch_size: int,
    height: int,
    width: int,
    in_channels: int,
    num_classes: int,
    depth: int,
    base_width: int,
    dtype: str = "float32",
) -> tuple[dict, dict]:
    """Builds the twin; returns (facts, timers {'train_step', 'inference'}).

    A train step is one SGD step, an inference call one forward pass; each
    blocks until done. Runs on the GPU when PyTorch sees one, else on the CPU.
    `dtype='bfloat16'` computes under autocast with float32 parameters, like
    `model.dtype`.
    """
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = TwinUNet(in_channels, num_classes, depth, base_width).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(batch_size, in_channels, height, width, device=device)
    labels = torch.randint(0, num_classes, (batch_size, height, width), device=device)
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"
    )

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = nn.functional.cross_entropy(model(images).float(), labels)
        loss.backward()
        optimizer.step()
        synchronize()

    def forward():
        model.eval()
        with torch.no_grad(), autocast:
            model(images)
        synchronize()

    facts = {
        "torch_version": torch.__version__,
        "torch_device": str(device),
        "torch_threads": torch.get_num_threads(),
        "num_params": sum(p.numel() for p in model.parameters()),
    }
    return facts, {"train_step": train_step, "inference": forward}
