"""The figures logged by transfer jobs: attention rollout, position-embedding similarity, confusion matrix."""

from __future__ import annotations

import torch

from pipeline.eval.plots import (
    attention_rollout,
    confusion_matrix,
    plot_attention_rollout,
    plot_confusion_matrix,
    plot_pos_embed_similarity,
    pos_embed_similarity,
)
from pipeline.model import build_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_rollout_of_uniform_attention_is_uniform_over_patches():
    n = 1 + 16
    maps = [torch.full((2, 3, n, n), 1.0 / n) for _ in range(4)]
    flow = attention_rollout(maps, num_prefix_tokens=1)
    assert flow.shape == (2, 16)
    torch.testing.assert_close(flow, torch.ones(2, 16))


def test_rollout_follows_attention_to_one_patch():
    n = 1 + 4
    a = torch.zeros(1, 2, n, n)
    a[..., 3] = 1.0  # every token attends only to token 3 (patch 2)
    flow = attention_rollout([a, a], num_prefix_tokens=1)
    assert int(flow.argmax()) == 2 and float(flow[0, 2]) == 1.0
    # residual identity keeps some mass on the [class] token's own path, none flows to patches 0, 1, 3
    assert torch.all(flow[0, [0, 1, 3]] == 0)


def test_pos_embed_similarity_is_cosine_with_unit_diagonal():
    pe = torch.randn(1, 1 + 9, 8)
    sim = pos_embed_similarity(pe, 1)
    assert sim.shape == (3, 3, 3, 3)
    diag = torch.stack([sim[i, j, i, j] for i in range(3) for j in range(3)])
    torch.testing.assert_close(diag, torch.ones(9))
    x = torch.nn.functional.normalize(pe[0, 1:], dim=-1)
    torch.testing.assert_close(sim[0, 1, 2, 2], x[1] @ x[8])


def test_confusion_matrix_counts_pairs():
    cm = confusion_matrix(torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 0, 2]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_pngs_from_a_real_model(tmp_path):
    model = build_model("vit_pico4", image_size=32, num_classes=10)
    images = torch.randn(3, 3, 32, 32)
    paths = [
        plot_attention_rollout(model, images, tmp_path / "attn.png"),
        plot_pos_embed_similarity(model.pos_embed, tmp_path / "pos.png", model.num_prefix_tokens),
        plot_confusion_matrix(torch.randint(0, 5, (10, 10)), tmp_path / "cm.png", [f"c{i}" for i in range(10)]),
    ]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000, p
    assert model.training  # the figure does not leave the model in eval mode
