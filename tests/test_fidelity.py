"""Training fidelity: compressed activations train as well as fp32 on real data."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import memfit

sklearn_datasets = pytest.importorskip("sklearn.datasets")


def digits_split():
    data = sklearn_datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n_test = 400
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def digits_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 16, 10),
    )


def train_digits(bits, epochs=6, seed=0):
    (xtr, ytr), (xte, yte) = digits_split()
    torch.manual_seed(seed)
    model = digits_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    order = torch.Generator().manual_seed(seed)
    mf = memfit.activations(model, bits=bits, min_bytes=0, seed=seed)
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=order)
        for i in range(0, len(ytr), 64):
            idx = perm[i : i + 64]
            with mf:
                loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    return acc * 100, mf.stats


def test_digits_cnn_4bit_accuracy_within_one_point_of_fp32():
    acc32, plain = train_digits(None)
    acc4, packed = train_digits(4)
    assert acc32 > 95.0, "the fp32 baseline must actually learn"
    assert abs(acc4 - acc32) <= 1.0, (acc32, acc4)
    # conv/BN/ReLU activations really were stored at 4 bits (max-pool's int64 indices stay exact)
    assert packed.counts["int4"] >= 6 and packed.ratio > 4.0
