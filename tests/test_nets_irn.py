"""IRNet's relation network and losses (vwe/nets/irn.py): architecture as IRNet's net/resnet50_irn.py
defines it, the frozen backbone, and the losses / affinity labels required equal to naive re-statements of
IRNet's AffinityDisplacementLoss, train_irn.py and GetAffinityLabelFromIndices (voc12/dataloader.py),
written from reading that code with plain loops (docs/irnet.md). Random weights; one ResNet-50 per module.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_labels_irn import naive_path_indices, naive_search_paths
from torch import nn

from vwe.labels.pathindex import path_index
from vwe.nets.irn import (IRNet, affinity_labels, downscale_label, infer_edge, irn_loss, pair_displacement,
                          pair_losses)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return IRNet()


def _units(seq: nn.ModuleList):
    """(in, out, GroupNorm groups, upsampling) of each 1x1 conv + GroupNorm unit, as IRNet lists them."""
    out = []
    for m in seq:
        if isinstance(m, nn.Conv2d):
            out.append((m.in_channels, m.out_channels, None, 1))
            continue
        conv = [x for x in m if isinstance(x, nn.Conv2d)]
        gn = [x for x in m if isinstance(x, nn.GroupNorm)][0]
        up = [x.scale_factor for x in m if isinstance(x, nn.Upsample)]
        out.append((conv[0].in_channels, conv[0].out_channels, gn.num_groups, up[0] if up else 1))
    return out


def test_architecture_as_irnet(net):
    # resnet50_irn.Net: fc_edge1..6 and fc_dp1..7
    assert _units(net.edge_layers) == [(64, 32, 4, 1), (256, 32, 4, 1), (512, 32, 4, 2), (1024, 32, 4, 4),
                                       (2048, 32, 4, 4), (160, 1, None, 1)]
    assert net.edge_layers[5].bias is not None
    assert _units(net.dp_layers) == [(64, 64, 8, 1), (256, 128, 16, 1), (512, 256, 16, 1), (1024, 256, 16, 2),
                                     (2048, 256, 16, 2), (768, 256, 16, 2), (448, 256, 16, 1)]
    last = net.dp_layers[6]
    assert isinstance(last[3], nn.Conv2d) and (last[3].in_channels, last[3].out_channels) == (256, 2)
    assert last[3].bias is None and last[4] is net.mean_shift
    for m in net.modules():
        if isinstance(m, nn.Upsample):
            assert m.mode == "bilinear" and m.align_corners is False


def test_backbone_strides_and_frozen(net):
    x = torch.randn(1, 3, 64, 64)
    feats = net.features(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 16, 16), (256, 16, 16), (512, 8, 8), (1024, 4, 4),
                                                  (2048, 4, 4)]
    assert not any(p.requires_grad for p in net.backbone.parameters())
    edge, dp = net.param_groups()
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in edge + dp}
    assert not {id(p) for p in edge} & {id(p) for p in dp}
    net.train()
    assert not net.backbone.training and net.edge_layers.training
    net.eval()


def test_forward_losses_and_gradients(net):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    net.train()
    edge, dp = net(x)
    assert edge.shape == (2, 1, 16, 16) and dp.shape == (2, 2, 16, 16)
    index = path_index(5, (16, 16))
    pos, neg, dp_fg, dp_bg = pair_losses(edge, dp, index)
    d, s = index.dst_indices.shape
    assert pos.shape == neg.shape == (2, d, s) and dp_fg.shape == dp_bg.shape == (2, 2, d, s)
    label = np.random.default_rng(0).choice([0, 3, 8, 255], size=(2, 16, 16)).astype(np.uint8)
    labs = [torch.from_numpy(np.stack(z)) for z in zip(*(affinity_labels(lab, index) for lab in label))]
    total, parts = irn_loss(pos, neg, dp_fg, dp_bg, *labs)
    total.backward()
    assert torch.isfinite(total) and set(parts) == {"pos_aff", "neg_aff", "dp_fg", "dp_bg"}
    assert all(p.grad is not None for p in net.edge_layers.parameters())
    assert all(p.grad is not None for p in net.dp_layers.parameters())
    assert all(p.grad is None for p in net.backbone.parameters())
    net.zero_grad(set_to_none=True)
    net.eval()


def test_mean_shift_only_in_eval(net):
    net.mean_shift.running_mean.copy_(torch.tensor([0.5, -1.0]))
    x = torch.randn(1, 3, 32, 32)
    net.train()
    with torch.no_grad():
        _, dp_train = net(x)
    net.eval()
    with torch.no_grad():
        _, dp_eval = net(x)
    torch.testing.assert_close(dp_eval, dp_train - torch.tensor([0.5, -1.0]).view(1, 2, 1, 1))
    net.mean_shift.running_mean.zero_()


def test_infer_edge_as_edge_displacement(net):
    """EdgeDisplacement.forward: the image and its mirror padded to the crop size, logits cropped to
    the strided size, averaged with the mirror's flipped back, sigmoid."""
    torch.manual_seed(2)
    image = torch.randn(3, 37, 50)
    edge = infer_edge(net, image, crop_size=64)
    assert edge.shape == (10, 13)
    pair = torch.stack([image, image.flip(-1)])
    pair = torch.nn.functional.pad(pair, [0, 64 - 50, 0, 64 - 37])
    with torch.no_grad():
        logits, _ = net(pair)
    logits = logits[..., :10, :13]
    torch.testing.assert_close(edge, torch.sigmoid(logits[0] / 2 + logits[1].flip(-1) / 2)[0])
    # symmetric in the mirror: the mirrored image's map is the mirrored map
    torch.testing.assert_close(infer_edge(net, image.flip(-1), crop_size=64), edge.flip(-1))
    # larger than the crop: padded to itself, not cut
    assert infer_edge(net, torch.randn(3, 70, 20), crop_size=64).shape == (18, 5)


# --------------------------------------------------------------------- naive re-statements of IRNet

def naive_pair_losses(edge_logits, dp, radius, size):
    """AffinityDisplacementLoss.forward per pair, by loops: aff = 1 - max sigmoid(edge) on the path;
    -log(aff + 1e-5), -log(1 + 1e-5 - aff); pair displacement dp[src] - dp[dst] for the source block
    (rows [0, H - rf), columns [rf, W - rf)); |pair - (dy, dx)| and |pair|."""
    prob = 1 / (1 + np.exp(-edge_logits))
    paths, src, dst = naive_path_indices(radius, size)
    dirs = np.concatenate([p[:, 0] for p in naive_search_paths(radius)])
    b = edge_logits.shape[0]
    rf = radius - 1
    ch, cw = size[0] - rf, size[1] - 2 * rf
    d, s = dst.shape
    pos, neg = np.zeros((b, d, s)), np.zeros((b, d, s))
    fg, bg = np.zeros((b, 2, d, s)), np.zeros((b, 2, d, s))
    for i in range(b):
        flat = prob[i].reshape(-1)
        row = 0
        for ind in paths:
            for k in range(ind.shape[0]):
                for j in range(s):
                    aff = 1 - max(flat[ind[k, l, j]] for l in range(ind.shape[1]))
                    pos[i, row, j] = -np.log(aff + 1e-5)
                    neg[i, row, j] = -np.log(1 + 1e-5 - aff)
                row += 1
        for k, (dy, dx) in enumerate(dirs):
            for y in range(ch):
                for x in range(cw):
                    pair = dp[i, :, y, rf + x] - dp[i, :, y + dy, rf + x + dx]
                    fg[i, :, k, y * cw + x] = np.abs(pair - np.array([dy, dx]))
                    bg[i, :, k, y * cw + x] = np.abs(pair)
    return pos, neg, fg, bg


def naive_affinity_labels(label, radius):
    """GetAffinityLabelFromIndices by loops over pairs: valid = both labels < 21; bg pos = same label 0;
    fg pos = same label > 0; neg = different labels, both valid."""
    _, src, dst = naive_path_indices(radius, label.shape)
    flat = label.reshape(-1)
    out = np.zeros((3,) + dst.shape, np.float32)
    for k in range(dst.shape[0]):
        for j in range(dst.shape[1]):
            a, b = int(flat[src[j]]), int(flat[dst[k, j]])
            if a < 21 and b < 21:
                if a == b:
                    out[0 if a == 0 else 1, k, j] = 1
                else:
                    out[2, k, j] = 1
    return out


def naive_total(pos, neg, fg, bg, bg_pos, fg_pos, neg_lab):
    """train_irn.run's loss lines, term by term."""
    bg_pos_aff = (bg_pos * pos).sum() / (bg_pos.sum() + 1e-5)
    fg_pos_aff = (fg_pos * pos).sum() / (fg_pos.sum() + 1e-5)
    pos_aff = bg_pos_aff / 2 + fg_pos_aff / 2
    neg_aff = (neg_lab * neg).sum() / (neg_lab.sum() + 1e-5)
    dp_fg = (fg * fg_pos[:, None]).sum() / (2 * fg_pos.sum() + 1e-5)
    dp_bg = (bg * bg_pos[:, None]).sum() / (2 * bg_pos.sum() + 1e-5)
    return (pos_aff + neg_aff) / 2 + (dp_fg + dp_bg) / 2


@pytest.mark.parametrize("radius,size", [(5, (11, 14)), (10, (20, 22))])
def test_losses_equal_irnet(radius, size):
    rng = np.random.default_rng(radius)
    edge = rng.normal(size=(2, 1) + size) * 3
    dp = rng.normal(size=(2, 2) + size) * 4
    index = path_index(radius, size)
    ours = pair_losses(torch.from_numpy(edge), torch.from_numpy(dp), index)
    theirs = naive_pair_losses(edge[:, 0], dp, radius, size)
    for o, t in zip(ours, theirs):
        np.testing.assert_allclose(o.numpy(), t, rtol=1e-12, atol=1e-12)
    label = rng.choice([0, 0, 2, 7, 255], size=(2,) + size).astype(np.uint8)
    labs = np.stack([np.stack(affinity_labels(lab, index)) for lab in label], axis=1)  # (3, B, D, S)
    for i in range(2):
        np.testing.assert_array_equal(labs[:, i], naive_affinity_labels(label[i], radius))
    total, _ = irn_loss(*ours, *(torch.from_numpy(x) for x in labs))
    assert total.item() == pytest.approx(naive_total(*theirs, *labs), rel=1e-6)


def test_pair_displacement_of_a_centred_field_is_the_direction():
    """A field pointing every pixel to one centre (centre - position) gives each pair src - dst = (dy, dx):
    the foreground displacement loss is 0 there, as IRNet's target intends."""
    h, w = 12, 15
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    dp = torch.stack([6 - yy, 7 - xx])[None]
    index = path_index(5, (h, w))
    pair = pair_displacement(dp, index)
    target = torch.from_numpy(index.directions.T.astype(np.float64))[None, :, :, None].expand_as(pair)
    torch.testing.assert_close(pair, target)


def test_downscale_label_as_pil_rescale():
    from PIL import Image
    rng = np.random.default_rng(7)
    label = rng.choice([0, 5, 255], size=(512, 512)).astype(np.uint8)
    small = downscale_label(label)
    assert small.shape == (128, 128) and set(np.unique(small)) <= {0, 5, 255}
    np.testing.assert_array_equal(small, np.asarray(Image.fromarray(label).resize((128, 128), Image.NEAREST)))
    odd = rng.choice([0, 5, 255], size=(37, 50)).astype(np.uint8)
    assert downscale_label(odd).shape == (9, 12)  # round(37/4), round(50/4) as IRNet's pil_rescale


def test_chain_smoke(net):
    """CAMs -> relation labels -> affinity labels at radius 10 -> a few steps of the branches (the loss
    falls) -> boundary map -> random-walk labels: the pieces fit together at IRNet's radii."""
    from vwe.labels.confident import cam_to_ir_label
    from vwe.labels.pathindex import IRN_RADIUS
    from vwe.labels.randomwalk import sem_seg_labels
    rng = np.random.default_rng(8)
    image = rng.integers(0, 60, (96, 96, 3), dtype=np.uint8)
    image[24:72, 30:80] = (220, 200, 40)
    high_res = (rng.random((1, 96, 96)) * 0.03).astype(np.float32)
    high_res[0, 30:66, 36:74] = 0.9
    ir = cam_to_ir_label(image, high_res, np.array([7]))
    assert {0, 8} <= set(np.unique(ir).tolist())
    index = path_index(IRN_RADIUS, (24, 24))
    labs = [torch.from_numpy(a)[None] for a in affinity_labels(downscale_label(ir), index)]
    assert all(a.sum() > 0 for a in labs)
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255 - 0.45
    opt = torch.optim.SGD([p for g in net.param_groups() for p in g], lr=0.1)
    net.train()
    losses = []
    for _ in range(4):
        total, _ = irn_loss(*pair_losses(*net(x), index), *labs)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < losses[0]
    net.eval()
    edge = infer_edge(net, x[0], crop_size=96)
    assert edge.shape == (24, 24) and ((edge >= 0) & (edge <= 1)).all()
    cam = torch.nn.functional.interpolate(torch.from_numpy(high_res)[None], (24, 24), mode="bilinear",
                                          align_corners=False)[0]
    labels = sem_seg_labels(edge, cam, np.array([7]), (96, 96))
    assert labels.shape == (96, 96) and set(np.unique(labels).tolist()) <= {0, 8} and (labels == 8).any()


# ----------------------------------------------------------------------- optimizer and schedule (train_irn)

class IrnetPolyOptimizer(torch.optim.SGD):
    """IRNet's misc/torchutils.py PolyOptimizer, restated: SGD(params, lr, weight_decay), whose third
    positional argument is SGD's momentum; before each step every group's lr = its initial lr x
    (1 - global_step / max_step) ** 0.9 (the `momentum` attribute holds the power)."""

    def __init__(self, params, lr, weight_decay, max_step, momentum=0.9):
        super().__init__(params, lr, weight_decay)
        self.global_step, self.max_step, self.power = 0, max_step, momentum
        self.initial_lr = [group["lr"] for group in self.param_groups]

    def step(self, closure=None):
        if self.global_step < self.max_step:
            for group, lr in zip(self.param_groups, self.initial_lr):
                group["lr"] = lr * (1 - self.global_step / self.max_step) ** self.power
        super().step(closure)
        self.global_step += 1


def test_shipped_recipe_optimizer_and_schedule_as_train_irn(tmp_path):
    """configs/voc_irn.yaml's relation network, built by the real Trainer setup, steps its weights as
    IRNet's train_irn.py does with run_sample.py's defaults: the groups (boundary 1x, displacement 10x,
    both with weight decay), momentum 1e-4, max_step (10582 // 32) x 3 and the poly lr of every one of
    its 990 steps, on the same gradients."""
    from vwe.formats.config import load_config, repo_configs_dir
    from vwe.stages.irn import IrnRecipe, irn_training_config
    from vwe.training.setup import build_parts, make_accelerator
    cfg = load_config(repo_configs_dir() / "voc_irn.yaml", ["irn.pretrained=none", f"output.run_dir={tmp_path}"])
    derived = irn_training_config(cfg)
    torch.manual_seed(0)
    parts = build_parts(derived, make_accelerator(derived), IrnRecipe(cfg), steps_epoch=10582 // 32)
    # run_sample.py: irn_batch_size 32, irn_num_epoches 3, irn_learning_rate 0.1, irn_weight_decay 1e-4
    assert parts.max_steps == (10582 // 32) * 3 == 990
    # IRNet's Net.trainable_parameters(): (edge_layers' parameters, dp_layers' parameters)
    edge, dp = tuple(parts.net.edge_layers.parameters()), tuple(parts.net.dp_layers.parameters())
    mine = parts.optimizer.param_groups
    assert [[id(p) for p in g["params"]] for g in mine] == [[id(p) for p in edge], [id(p) for p in dp]]
    copies = [[p.detach().clone().requires_grad_(True) for p in ps] for ps in (edge, dp)]
    ref = IrnetPolyOptimizer([{"params": copies[0], "lr": 1 * 0.1, "weight_decay": 1e-4},
                              {"params": copies[1], "lr": 10 * 0.1, "weight_decay": 1e-4}],
                             lr=0.1, weight_decay=1e-4, max_step=990)
    for g, r in zip(mine, ref.param_groups):
        assert (g["momentum"], g["weight_decay"], g["dampening"], g["nesterov"]) == \
            (r["momentum"], r["weight_decay"], r["dampening"], r["nesterov"]) == (1e-4, 1e-4, 0, False)
    gen = torch.Generator().manual_seed(1)
    for step in range(990):
        for p, q in zip([*edge, *dp], [*copies[0], *copies[1]]):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        used = [g["lr"] for g in mine]  # the lr of this step's update
        parts.optimizer.step()  # micro_step's order: the update, then the schedule
        parts.scheduler.step()
        ref.step()  # sets the lr, then updates
        assert used == pytest.approx([g["lr"] for g in ref.param_groups], rel=1e-12), step
    for p, q in zip([*edge, *dp], [*copies[0], *copies[1]]):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
