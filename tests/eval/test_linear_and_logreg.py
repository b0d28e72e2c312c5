"""Linear probe and logistic regression on constructed data with a known optimum."""

import numpy as np
import pytest
import torch

from dinov2.configuration.evaluation import LinearParams
from dinov2.eval.linear import carve_validation, linear_probe, probe_views
from dinov2.eval.logreg import c_grid, logistic_regression


def blobs(n_per_class: int, seed: int, noise_dims: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well separated Gaussian blobs in columns 0-7 (centres 10 apart, std 0.5), then pure noise."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.zeros(3, 8)
    centres[0, 0], centres[1, 1], centres[2, 2] = 10.0, 10.0, 10.0
    labels = torch.arange(3).repeat_interleave(n_per_class)
    signal = centres[labels] + 0.5 * torch.randn(len(labels), 8, generator=generator)
    noise = torch.randn(len(labels), noise_dims, generator=generator)
    return torch.cat([signal, noise], dim=1), labels


def test_probe_views_slice_the_cls_blocks_and_the_mean_patch_token():
    # Layout of probe_tokens for 4 stored blocks of width 10: [cls-4, cls-3, cls-2, cls-1, patch mean].
    assert probe_views(4, 10) == {
        "blocks1": (30, 40),
        "blocks1_avgpool": (30, 50),
        "blocks4": (0, 40),
        "blocks4_avgpool": (0, 50),
    }
    # A 2-block model: "last 4 blocks" is clipped to its 2.
    assert probe_views(2, 10) == {"blocks1": (10, 20), "blocks1_avgpool": (10, 30), "blocks2": (0, 20),
                                  "blocks2_avgpool": (0, 30)}  # fmt: skip


def test_validation_is_carved_per_class_from_train():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    fit, val = carve_validation(labels, 0.1, seed=0)
    assert sorted(labels[val].tolist()) == [0] * 5 + [1] * 3 + [2] * 2
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(100))


def test_linear_probe_separates_blobs_and_selects_the_informative_view():
    train, train_labels = blobs(100, seed=0)
    test, test_labels = blobs(50, seed=1)
    views = {"signal": (0, 8), "noise": (8, 16)}
    result = linear_probe(train, train_labels, test, test_labels, views, learning_rates=(1e-3, 1e-1), epochs=5,
                          batch_size=32, val_fraction=0.1)  # fmt: skip
    assert result.selected.view == "signal"
    assert result.test_top1 == 1.0
    assert result.val_top1["noise_lr0.1"] < 0.6  # chance is 1/3
    assert (result.n_train, result.n_val) == (270, 30)


def test_linear_probe_never_selects_on_the_test_split():
    # The same train split with correct and with scrambled test labels: the selected head and every
    # validation score must be identical (selection cannot have looked at test), and only the
    # reported test accuracy changes.
    train, train_labels = blobs(100, seed=0)
    test, test_labels = blobs(50, seed=1)
    views = {"signal": (0, 8), "noise": (8, 16), "both": (0, 16)}
    honest = linear_probe(
        train,
        train_labels,
        test,
        test_labels,
        views,
        epochs=3,
        batch_size=64,
        learning_rates=LinearParams().learning_rates,
        val_fraction=0.1,
    )
    scrambled_labels = (test_labels + 1) % 3
    scrambled = linear_probe(
        train,
        train_labels,
        test,
        scrambled_labels,
        views,
        epochs=3,
        batch_size=64,
        learning_rates=LinearParams().learning_rates,
        val_fraction=0.1,
    )
    assert scrambled.selected == honest.selected
    assert scrambled.val_top1 == honest.val_top1
    assert honest.test_top1 == 1.0 and scrambled.test_top1 == 0.0
    assert len(honest.heads) == 3 * 13


def test_linear_probe_refuses_test_classes_unknown_to_train():
    train, train_labels = blobs(10, seed=0)
    with pytest.raises(ValueError, match="test split has class index 5 but train only 3 classes"):
        linear_probe(
            train,
            train_labels,
            train[:2],
            torch.tensor([0, 5]),
            {"all": (0, 16)},
            epochs=1,
            learning_rates=(0.1,),
            batch_size=8,
            val_fraction=0.1,
        )


def test_logistic_regression_reaches_perfect_accuracy_on_separable_blobs():
    train, train_labels = blobs(60, seed=0)
    test, test_labels = blobs(30, seed=1)
    result = logistic_regression(train, train_labels, test, test_labels)
    assert len(result.holdout_top1) == 45
    assert min(result.holdout_top1) == pytest.approx(1e-6) and max(result.holdout_top1) == pytest.approx(1e5)
    assert result.test_top1 == 1.0
    # Ties go to the strongest regularisation that still scores best on the holdout.
    best = max(result.holdout_top1.values())
    assert result.selected_c == min(c for c, score in result.holdout_top1.items() if score == best)


def test_logistic_regression_is_deterministic_and_refuses_unseen_test_classes():
    train, train_labels = blobs(20, seed=0)
    grid = c_grid(-2, 2, 5)
    first = logistic_regression(train, train_labels, train, train_labels, c_values=grid)
    second = logistic_regression(train, train_labels, train, train_labels, c_values=grid)
    assert first == second
    np.testing.assert_allclose(grid, [0.01, 0.1, 1, 10, 100])
    with pytest.raises(ValueError, match=r"test classes \[7\] never occur"):
        logistic_regression(train, train_labels, train[:1], torch.tensor([7]), c_values=grid)
