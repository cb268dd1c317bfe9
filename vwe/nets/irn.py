"""IRNet's inter-pixel relation network and its losses (docs/irnet.md, "The relation network"; IRNet's
net/resnet50_irn.py and step/train_irn.py).

A frozen ResNet-50 at output stride 16 (strides 2, 2, 2, 1; the stem's max pool gives stride 4) feeds two
branches that train:
- the class-boundary branch: each of the five stage outputs (stem after max pool, layer1..layer4) through
  a 1x1 conv to 32 channels, GroupNorm(4), ReLU (upsampled x2 / x4 / x4 from layer2 / layer3 / layer4),
  concatenated (160 channels) at stride 4 and a 1x1 conv with bias to one boundary logit;
- the displacement branch: stem -> 64, layer1 -> 128, layer2 -> 256, layer3 -> 256 (x2), layer4 -> 256
  (x2), the last three joined at stride 8 through a 1x1 conv 768 -> 256 (x2), then with the first two at
  stride 4 through 448 -> 256 -> 2, minus a mean displacement (`mean_shift`, subtracted in eval mode
  only; used by instance segmentation, not by the semantic labels).

The affinity of a pixel pair is 1 - the largest boundary probability on the path between them (the path
index of vwe.labels.pathindex, radius 10 at stride 4 for training).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vwe.labels.pathindex import PathIndex
from vwe.labels.randomwalk import edge_to_affinity
from vwe.nets.backbone import Backbone

STRIDE = 4
NUM_LABELS = 21          # background + 20 classes (vwe.data.voc.NUM_LABELS; nets sit below data); >= 21 is unsure
CROP_SIZE = 512          # run_sample.py --irn_crop_size; also EdgeDisplacement's inference padding
EPS = 1e-5               # resnet50_irn.py / train_irn.py: inside the logs and the loss denominators


def _unit(cin: int, cout: int, groups: int, up: int = 1) -> nn.Sequential:
    """1x1 conv without bias, GroupNorm, (bilinear upsampling), ReLU: IRNet's branch unit."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 1, bias=False), nn.GroupNorm(groups, cout)]
    if up > 1:
        layers.append(nn.Upsample(scale_factor=up, mode="bilinear", align_corners=False))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class MeanShift(nn.Module):
    """Subtracts `running_mean` (the mean displacement over the training images) in eval mode only."""

    def __init__(self, num_features: int = 2) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.training else x - self.running_mean.view(1, -1, 1, 1)


class IRNet(nn.Module):
    """Frozen ResNet-50 + class-boundary and displacement branches. forward(images) -> (boundary logits
    (B, 1, h, w), displacements (B, 2, h, w)) at stride 4 (h = ceil(H / 4) for H divisible by 16)."""

    def __init__(self, backbone: str = "resnet50") -> None:
        super().__init__()
        # frozen_all: the backbone never learns, BatchNorm's gamma/beta included (IRNet detaches every
        # stage output); torchvision key names, so vwe's ImageNet loading applies unchanged
        self.backbone = Backbone(backbone, norm="frozen_all")
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        c = [64] + [s[-1].conv3.out_channels if hasattr(s[-1], "conv3") else s[-1].conv2.out_channels
                    for s in self.backbone.stages()]
        self.edge_layers = nn.ModuleList([
            _unit(c[0], 32, 4), _unit(c[1], 32, 4), _unit(c[2], 32, 4, up=2), _unit(c[3], 32, 4, up=4),
            _unit(c[4], 32, 4, up=4), nn.Conv2d(160, 1, 1, bias=True)])
        self.dp_layers = nn.ModuleList([
            _unit(c[0], 64, 8), _unit(c[1], 128, 16), _unit(c[2], 256, 16), _unit(c[3], 256, 16, up=2),
            _unit(c[4], 256, 16, up=2), _unit(768, 256, 16, up=2),
            nn.Sequential(nn.Conv2d(448, 256, 1, bias=False), nn.GroupNorm(16, 256), nn.ReLU(inplace=True),
                          nn.Conv2d(256, 2, 1, bias=False), MeanShift(2))])

    @property
    def mean_shift(self) -> MeanShift:
        # registered once, inside the displacement branch: a second registration would put one tensor under
        # two names in the state dict, which safetensors refuses to export
        return self.dp_layers[6][4]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five stage outputs, without gradient (the backbone is frozen)."""
        b = self.backbone
        with torch.no_grad():
            x1 = b.maxpool(b.relu(b.bn1(b.conv1(x))))
            x2 = b.layer1(x1)
            x3 = b.layer2(x2)
            x4 = b.layer3(x3)
            x5 = b.layer4(x4)
        return [x1, x2, x3, x4, x5]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(x)
        e = self.edge_layers
        edges = [e[0](feats[0]), e[1](feats[1])]
        hw = edges[1].shape[-2:]
        edges += [e[i](feats[i])[..., :hw[0], :hw[1]] for i in (2, 3, 4)]
        edge = e[5](torch.cat(edges, dim=1))

        d = self.dp_layers
        dp1, dp2, dp3 = d[0](feats[0]), d[1](feats[1]), d[2](feats[2])
        h3, w3 = dp3.shape[-2:]
        dp4 = d[3](feats[3])[..., :h3, :w3]
        dp5 = d[4](feats[4])[..., :h3, :w3]
        h2, w2 = dp2.shape[-2:]
        up3 = d[5](torch.cat([dp3, dp4, dp5], dim=1))[..., :h2, :w2]
        dp = d[6](torch.cat([dp1, dp2, up3], dim=1))
        return edge, dp

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(boundary branch, displacement branch): IRNet trains them at 1x and 10x the learning rate."""
        return list(self.edge_layers.parameters()), list(self.dp_layers.parameters())

    def train(self, mode: bool = True) -> IRNet:
        super().train(mode)
        self.backbone.eval()
        return self


# -------------------------------------------------------------------------------------------- losses

def pair_displacement(dp: torch.Tensor, index: PathIndex) -> torch.Tensor:
    """(B, 2, H, W) displacements -> (B, 2, D, S): source's minus destination's, per pair."""
    rf = index.radius_floor
    ch, cw = index.source_shape
    src = dp[:, :, :ch, rf:rf + cw]
    dst = torch.stack([dp[:, :, dy:dy + ch, rf + dx:rf + dx + cw] for dy, dx in index.directions.tolist()], 2)
    pair = src.unsqueeze(2) - dst
    return pair.reshape(pair.shape[0], pair.shape[1], pair.shape[2], -1)


def pair_losses(edge_logits: torch.Tensor, dp: torch.Tensor, index: PathIndex
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """IRNet's per-pair losses (AffinityDisplacementLoss.forward): -log(aff + eps) (pairs of one class),
    -log(1 + eps - aff) (pairs of two classes), |pair displacement - direction| (foreground pairs, the
    displacements should point to one centre) and |pair displacement| (background pairs). Shapes
    (B, D, S), (B, D, S), (B, 2, D, S), (B, 2, D, S)."""
    aff = edge_to_affinity(torch.sigmoid(edge_logits), index)
    pos = -torch.log(aff + EPS)
    neg = -torch.log(1.0 + EPS - aff)
    pair = pair_displacement(dp, index)
    target = torch.from_numpy(index.directions.T.copy()).to(pair)[None, :, :, None]  # (1, 2, D, 1) (dy, dx)
    return pos, neg, (pair - target).abs(), pair.abs()


def irn_loss(pos: torch.Tensor, neg: torch.Tensor, dp_fg: torch.Tensor, dp_bg: torch.Tensor,
             bg_pos_label: torch.Tensor, fg_pos_label: torch.Tensor, neg_label: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """train_irn.py's total loss from the per-pair losses and the (B, D, S) affinity labels:
    (pos + neg) / 2 + (dp_fg + dp_bg) / 2 with pos the mean of the background and the foreground pair
    means, each term a label-weighted mean. Returns (total, the four terms)."""
    bg_pos = (bg_pos_label * pos).sum() / (bg_pos_label.sum() + EPS)
    fg_pos = (fg_pos_label * pos).sum() / (fg_pos_label.sum() + EPS)
    pos_aff = bg_pos / 2 + fg_pos / 2
    neg_aff = (neg_label * neg).sum() / (neg_label.sum() + EPS)
    # 2 *: the displacement losses hold two components per pair
    dp_fg_loss = (dp_fg * fg_pos_label.unsqueeze(1)).sum() / (2 * fg_pos_label.sum() + EPS)
    dp_bg_loss = (dp_bg * bg_pos_label.unsqueeze(1)).sum() / (2 * bg_pos_label.sum() + EPS)
    total = (pos_aff + neg_aff) / 2 + (dp_fg_loss + dp_bg_loss) / 2
    return total, {"pos_aff": pos_aff, "neg_aff": neg_aff, "dp_fg": dp_fg_loss, "dp_bg": dp_bg_loss}


# ------------------------------------------------------------------------------------ affinity labels

def downscale_label(label: np.ndarray, scale: float = 1 / STRIDE) -> np.ndarray:
    """A crop's relation label map at the feature size: PIL nearest-neighbour resize to
    round(H * scale) x round(W * scale) (IRNet's pil_rescale(label, 0.25, order 0))."""
    h, w = label.shape
    size = (int(np.round(h * scale)), int(np.round(w * scale)))
    if size == (h, w):
        return label
    return np.asarray(Image.fromarray(label).resize(size[::-1], Image.NEAREST))


def affinity_labels(label: np.ndarray, index: PathIndex) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(h, w) relation labels at the feature size (0 background, 1..20 classes, 255 unsure) -> three
    (D, S) float32 masks over the index's pairs: both ends background, both ends the same object class,
    two different known labels (IRNet's GetAffinityLabelFromIndices)."""
    flat = np.asarray(label).reshape(-1)
    if flat.size != index.size[0] * index.size[1]:
        raise ValueError(f"label map {label.shape} does not match the path index size {index.size}")
    src = flat[index.src_indices][None, :]
    dst = flat[index.dst_indices]
    valid = (src < NUM_LABELS) & (dst < NUM_LABELS)
    same = src == dst
    pos = same & valid
    return ((pos & (src == 0)).astype(np.float32), (pos & (src > 0)).astype(np.float32),
            (~same & valid).astype(np.float32))


# ------------------------------------------------------------------------------------------ inference

@torch.no_grad()
def infer_edge(net: IRNet, image: torch.Tensor, crop_size: int = CROP_SIZE) -> torch.Tensor:
    """Boundary probabilities (ceil(H/4), ceil(W/4)) of one normalised (3, H, W) image, as IRNet's
    EdgeDisplacement: the image and its mirror, zero-padded at the bottom and right to crop_size (or to
    the image where it is larger: IRNet would cut it), logits averaged, sigmoid."""
    h, w = image.shape[-2:]
    fh, fw = (h - 1) // STRIDE + 1, (w - 1) // STRIDE + 1
    pair = torch.stack([image, image.flip(-1)])
    pair = F.pad(pair, [0, max(crop_size, w) - w, 0, max(crop_size, h) - h])
    logits, _ = net(pair)
    logits = logits[..., :fh, :fw]
    return torch.sigmoid(logits[0, 0] / 2 + logits[1, 0].flip(-1) / 2)
