"""Attribute classifier: metrics vs plain implementations, heads and loss on hand-made data, the job in-process."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pyarrow as pa
import pytest
import torch

from prism_ray.scoring import classification as cm

# --- metrics against plain implementations -----------------------------------------------------


def plain_auroc(y, s):
    """P(score of a random positive > score of a random negative), ties counting half, by counting pairs."""
    pos, neg = [a for a, t in zip(s, y, strict=True) if t], [a for a, t in zip(s, y, strict=True) if not t]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def plain_ece(y, p, bins=10):
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i in range(len(p)) if lo <= p[i] < hi or (b == bins - 1 and p[i] == 1.0)]
        if members:
            conf = sum(p[i] for i in members) / len(members)
            freq = sum(y[i] for i in members) / len(members)
            total += len(members) / len(p) * abs(freq - conf)
    return total


def test_auroc_with_ties_matches_pair_counting():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.random(40) < 0.3
        y[:2] = [True, False]
        s = rng.integers(0, 6, 40) / 5.0  # many ties
        assert cm.auroc(y, s) == pytest.approx(plain_auroc(y, s), abs=1e-12)
    assert cm.auroc([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2]) == 1.0
    assert cm.auroc([1, 0], [0.5, 0.5]) == 0.5
    assert math.isnan(cm.auroc([1, 1], [0.2, 0.3]))


def test_ece_accuracy_and_balanced_accuracy_match_loops():
    rng = np.random.default_rng(1)
    y = (rng.random(200) < 0.4).astype(float)
    p = np.clip(rng.random(200), 0, 1)
    p[:3] = [0.0, 1.0, 0.5]
    assert cm.ece(y, p) == pytest.approx(plain_ece(list(y), list(p)), abs=1e-12)
    assert cm.ece([1, 0], [1.0, 0.0]) == 0.0
    assert cm.accuracy([1, 0, 1, 0], [0.7, 0.2, 0.4, 0.5]) == 0.5  # 0.5 counts as positive
    # TPR 1/2, TNR 2/2 -> 0.75
    assert cm.balanced_accuracy([1, 1, 0, 0], [0.9, 0.1, 0.2, 0.3]) == 0.75


def test_the_decision_is_positive_at_exactly_half_and_a_flip_is_a_changed_decision():
    from prism_ray.scoring.filter import off_target_heads
    from prism_ray.scoring.metrics import flip_rate

    assert cm.decision(0.5) and not cm.decision(np.nextafter(0.5, 0.0)) and not cm.decision(float("nan"))
    np.testing.assert_array_equal(cm.decision(np.array([0.49, 0.5, 0.51])), [False, True, True])
    assert bool(cm.logit_decision(torch.tensor(0.0))) and not bool(cm.logit_decision(torch.tensor(-1e-6)))
    assert bool(cm.logit_decision(torch.tensor(0.0))) == cm.decision(float(torch.sigmoid(torch.tensor(0.0))))
    assert cm.flipped(0.49, 0.5) and not cm.flipped(0.5, 0.9) and cm.flipped(0.5, 0.49)
    assert cm.accuracy(np.array([1]), np.array([0.5])) == 1.0
    assert flip_rate(np.array([0.5, 0.5]), np.array([0.4, 0.6])) == 0.5
    # the off-target filter reads the same rule: 0.4 -> 0.5 flips the head, 0.5 -> 0.6 does not
    heads = off_target_heads(np.array([0.4, 0.5]), np.array([[0.5, 0.6]]), ["a", "b"], [set()], max_shift=1.0)
    assert heads == [["a"]]
    # the phantom's age bin reads its thermometer heads by the same rule (it used p > 0.5 before)
    from prism_ray.phantom.demographic import age_bin_from_heads

    assert age_bin_from_heads(np.array([[0.5, 0.49]]), ["age_ge_40", "age_ge_60"]).tolist() == [40]


def test_worst_group_accuracy_is_the_lowest_label_by_group_cell():
    y = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    p = np.array([0.9, 0.8, 0.1, 0.2, 0.9, 0.9, 0.7, 0.1])
    g = np.array(["dev", "dev", "none", "none", "dev", "dev", "none", "none"])
    cells = {}
    for label, group in itertools.product((0, 1), ("dev", "none")):
        idx = [i for i in range(len(y)) if y[i] == label and g[i] == group]
        if idx:
            cells[(label, group)] = sum((p[i] >= 0.5) == y[i] for i in idx) / len(idx)
    assert cm.group_accuracies(y, p, g) == cells
    assert cm.worst_group_accuracy(y, p, g) == min(cells.values()) == 0.0  # (0, dev): both wrong
    assert math.isnan(cm.worst_group_accuracy(y, p, g, min_size=3))  # no cell has 3 rows


def test_bootstrap_ci_is_seeded_and_brackets_the_value():
    rng = np.random.default_rng(2)
    y = rng.random(300) < 0.5
    p = np.clip(y * 0.3 + rng.random(300) * 0.7, 0, 1)
    a = cm.bootstrap_ci(cm.auroc, (y, p), n_boot=200, seed=3)
    assert a == cm.bootstrap_ci(cm.auroc, (y, p), n_boot=200, seed=3)
    assert a[0] < cm.auroc(y, p) < a[1] and a[1] - a[0] < 0.2
    rows = cm.head_metrics(y.astype(float), p, {"sex": np.where(rng.random(300) < 0.5, "F", "M")}, n_boot=50)
    by = {(r["attribute"], r["group"], r["label"], r["metric"]): r for r in rows}
    assert by[("all", "all", None, "auroc")]["value"] == pytest.approx(cm.auroc(y, p))
    worst = by[("sex", "worst", None, "worst_group_accuracy")]["value"]
    assert worst == min(r["value"] for k, r in by.items() if k[0] == "sex" and k[2] is not None)


def test_t_test_sign_flip_and_mean_ci():
    # Closed forms: df=1 (Cauchy) p = 1 - 2/pi atan|t|; df=2 p = 1 - |t| / sqrt(2 + t^2).
    for t in (0.3, 1.0, 2.5, 10.0):
        assert cm.t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), abs=1e-10)
        assert cm.t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-10)
    assert cm.t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-5)
    d = np.array([0.1, 0.2, 0.3])
    t, p = cm.paired_t_test(d)
    assert t == pytest.approx(0.2 / (0.1 / math.sqrt(3)))
    assert p == pytest.approx(cm.t_two_sided_p(t, 2))
    assert cm.sign_flip_p(d) == 0.25  # all positive: only the two extreme patterns are as large
    assert cm.sign_flip_p(np.array([0.1, -0.1, 0.2, -0.2])) == 1.0
    mean, sd, _, hi = cm.mean_ci(d)
    assert (mean, sd) == (pytest.approx(0.2), pytest.approx(0.1))
    assert hi - mean == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)


# --- heads, loss, sampling, stopping -----------------------------------------------------------


def test_head_targets_from_findings_and_text_columns():
    from prism_ray.data.targets import head_targets

    table = pa.table({"Effusion": [1.0, 0.0, -1.0, None], "Sex": ["Female", "Male", None, "Female"]})
    heads = {"effusion": "Effusion", "female": "Sex=Female"}
    t = head_targets(table, heads, "negative")
    np.testing.assert_array_equal(t[:, 1][[0, 1, 3]], [1, 0, 1])
    assert np.isnan(t[2, 1]) and np.isnan(t[3, 0]) and t[2, 0] == 0
    assert (
        np.isnan(head_targets(table, heads, "ignore")[2, 0])
        and head_targets(table, heads, "positive")[2, 0] == 1
    )
    with pytest.raises(ValueError, match="heads.x"):
        head_targets(table, {"x": "Missing"})


def test_loss_weights_and_balanced_sampling():
    from prism_ray.training.classifier import balanced_row_weights, batch_indices, multi_head_loss, pos_weight

    y = np.array([[1, 0], [0, 0], [0, 1], [0, np.nan]], np.float32)
    np.testing.assert_allclose(pos_weight(y), [3.0, 2.0])
    w = balanced_row_weights(y)
    assert w.sum() == pytest.approx(1.0)
    # Each head's positives carry as much weight as its negatives, per head.
    h0 = np.where(y[:, 0] == 1, 0.5 / 1, 0.5 / 3)
    h1 = np.where(np.isnan(y[:, 1]), 0, np.where(y[:, 1] == 1, 0.5, 0.25))
    expected = (h0 + h1) / np.array([2, 2, 2, 1])
    np.testing.assert_allclose(w, expected / expected.sum())

    logits = torch.tensor([[2.0, -1.0], [0.5, 0.0], [-1.0, 3.0], [0.0, 9.0]])
    target = torch.as_tensor(y)
    pw = torch.tensor([3.0, 2.0])
    manual = []
    for i in range(4):
        for h in range(2):
            if not math.isnan(y[i, h]):
                s = torch.sigmoid(logits[i, h])
                manual.append(-(pw[h] * y[i, h] * torch.log(s) + (1 - y[i, h]) * torch.log(1 - s)))
    assert multi_head_loss(logits, target, pw).item() == pytest.approx(
        torch.stack(manual).mean().item(), rel=1e-6
    )

    a = batch_indices(10, 4, step=3, seed=1, rank=0)
    assert np.array_equal(a, batch_indices(10, 4, step=3, seed=1, rank=0))
    epoch = np.concatenate([batch_indices(10, 5, step=s, seed=1, rank=0) for s in (1, 2)])
    assert sorted(epoch) == list(range(10))  # an epoch sees every row once
    drawn = np.concatenate([batch_indices(4, 64, step=s, seed=0, rank=0, weights=w) for s in range(1, 40)])
    assert np.mean(y[drawn, 0] == 1) == pytest.approx(w[0], abs=0.05)


def test_early_stopping_counts_evaluations_without_improvement():
    from prism_ray.training.classifier import EarlyStopping

    s = EarlyStopping(patience=2, min_delta=0.01)
    assert s.update(10, 0.5) and not s.update(20, 0.495) and not s.should_stop
    assert not s.update(30, 0.6) and s.should_stop and (s.best, s.best_step) == (0.5, 10)
    t = EarlyStopping(patience=2)
    t.load(s.state())
    assert t.should_stop


def test_early_stopping_in_max_mode_keeps_the_highest_value():
    from prism_ray.training.classifier import EarlyStopping

    s = EarlyStopping(patience=2, min_delta=0.01, mode="max")
    assert s.best == -math.inf and s.update(10, 0.5) and not s.update(20, 0.505)  # within min_delta
    assert s.update(30, 0.7) and not s.update(40, math.nan) and not s.update(50, 0.6) and s.should_stop
    assert (s.best, s.best_step) == (0.7, 30)
    with pytest.raises(ValueError, match="mode 'max'"):
        EarlyStopping(patience=2).load(s.state())  # a best accuracy is not a best loss


# --- groups, group-balanced sampling, Group DRO --------------------------------------------------

Y_GROUPS = np.array(
    [[1, 0, 1], [0, 0, 0], [1, 1, 0], [0, np.nan, 1], [1, 0, 0], [0, 0, np.nan], [1, 0, 1]], np.float32
)  # heads: effusion, devices, female


def test_group_ids_are_the_joint_label_with_unknown_as_its_own_value():
    from prism_ray.training.classifier import group_ids, group_names

    g = group_ids(Y_GROUPS, [0, 1])  # effusion + 3 * devices, '?' = 2
    np.testing.assert_array_equal(g, [1, 0, 4, 6, 1, 0, 1])
    names = group_names(["effusion", "devices"])
    assert len(names) == 9 and [names[i] for i in (0, 1, 4, 6)] == [
        "effusion=0,devices=0", "effusion=1,devices=0", "effusion=1,devices=1", "effusion=0,devices=?"
    ]  # fmt: skip
    np.testing.assert_array_equal(group_ids(Y_GROUPS, [2]), [1, 0, 0, 1, 0, 2, 1])
    np.testing.assert_array_equal(group_ids(Y_GROUPS, []), np.zeros(7))  # no group heads: one group


def test_group_balanced_sampling_gives_every_group_the_same_mass():
    from prism_ray.training.classifier import batch_indices, group_balanced_row_weights, group_ids

    g = group_ids(Y_GROUPS, [0, 1])  # groups 0 (2 rows), 1 (3 rows), 4 (1 row), 6 (1 row)
    w = group_balanced_row_weights(g)
    np.testing.assert_allclose(w, [1 / 12, 1 / 8, 1 / 4, 1 / 4, 1 / 12, 1 / 8, 1 / 12])
    for group in (0, 1, 4, 6):
        assert w[g == group].sum() == pytest.approx(0.25)
    drawn = np.concatenate([batch_indices(7, 64, step=s, seed=0, rank=0, weights=w) for s in range(1, 60)])
    shares = np.bincount(g[drawn], minlength=9)[[0, 1, 4, 6]] / len(drawn)
    np.testing.assert_allclose(shares, 0.25, atol=0.02)


def _bce(logit, y, pw=1.0):
    s = 1 / (1 + math.exp(-logit))
    return -(pw * y * math.log(s) + (1 - y) * math.log(1 - s))


def test_group_losses_and_one_group_dro_update_match_plain_numpy():
    from prism_ray.training.classifier import group_dro_update, group_ids, group_losses

    rng = np.random.default_rng(4)
    logits = rng.normal(size=Y_GROUPS.shape)
    g = group_ids(Y_GROUPS, [0, 1])
    pw = np.array([2.0, 1.0, 0.5])
    sums, counts = group_losses(
        torch.as_tensor(logits, dtype=torch.float32), torch.as_tensor(Y_GROUPS), torch.as_tensor(g), 9,
        torch.as_tensor(pw, dtype=torch.float32),
    )  # fmt: skip
    plain_sums, plain_counts = np.zeros(9), np.zeros(9)
    for i, j in itertools.product(range(7), range(3)):
        if not math.isnan(Y_GROUPS[i, j]):
            plain_sums[g[i]] += _bce(logits[i, j], Y_GROUPS[i, j], pw[j])
            plain_counts[g[i]] += 1
    np.testing.assert_allclose(sums.numpy(), plain_sums, rtol=1e-5)
    np.testing.assert_array_equal(counts.numpy(), plain_counts)

    # q_g <- q_g exp(eta loss_g) / sum: a group absent from the batch has loss 0, a group with q = 0 stays 0.
    q = np.array([0.3, 0.2, 0.0, 0.0, 0.4, 0.0, 0.1, 0.0, 0.0])
    loss = np.divide(plain_sums, plain_counts, out=np.zeros(9), where=plain_counts > 0)
    for eta in (0.01, 1.0):
        plain = q * np.exp(eta * loss)
        plain /= plain.sum()
        new = group_dro_update(torch.as_tensor(q), torch.as_tensor(loss), eta).numpy()
        np.testing.assert_allclose(new, plain, rtol=1e-12)
    assert new[2] == 0.0 and new[4] > q[4]


class _Linear(torch.nn.Module):
    """A tiny real model with the classifiers' interface: `model(pixels).logits`, (B, H)."""

    def __init__(self, side: int, heads: int):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(side * side, heads)

    def forward(self, pixels):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.linear(pixels.flatten(1)))


def test_group_dro_step_is_algorithm_1_and_two_workers_share_one_q():
    from prism_ray.training.classifier import TorchStepper, group_dro_step, group_ids, group_losses

    x = torch.as_tensor(np.random.default_rng(5).normal(size=(7, 1, 4, 4)), dtype=torch.float32)
    y, g = torch.as_tensor(Y_GROUPS), torch.as_tensor(group_ids(Y_GROUPS, [0, 1]))
    q0 = torch.tensor([0.25, 0.25, 0, 0, 0.25, 0, 0.25, 0, 0], dtype=torch.float64)

    model = _Linear(4, 3)
    with torch.no_grad():
        logits = model(x).logits.double().numpy()
    plain = np.zeros(9)
    counts = np.zeros(9)
    for i, j in itertools.product(range(7), range(3)):
        if not math.isnan(Y_GROUPS[i, j]):
            plain[g[i]] += _bce(logits[i, j], Y_GROUPS[i, j])
            counts[g[i]] += 1
    mean = np.divide(plain, counts, out=np.zeros(9), where=counts > 0)
    q1 = q0.numpy() * np.exp(0.5 * mean)
    q1 /= q1.sum()
    # The weights' gradient of sum_g q1_g loss_g, by autograd on a copy (q1 a constant).
    copy = _Linear(4, 3)
    sums, n = group_losses(copy(x).logits, y, g, 9)
    (torch.as_tensor(q1, dtype=torch.float32) * sums / n.clamp(min=1)).sum().backward()
    expected = copy.linear.weight.detach() - 0.1 * copy.linear.weight.grad

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, _, q = group_dro_step(model, TorchStepper(model, optimizer, None), x, y, g, q0, step_size=0.5)
    np.testing.assert_allclose(q.numpy(), q1, rtol=1e-6)
    assert loss.item() == pytest.approx(float(q1 @ mean), rel=1e-5)
    torch.testing.assert_close(model.linear.weight.detach(), expected)

    # Two workers, each half the batch: with the group sums and counts averaged over both, each gets the q
    # of the whole batch.
    halves = [slice(0, 4), slice(4, 7)]
    stats = []
    for h in halves:
        s_, c_ = group_losses(_Linear(4, 3)(x[h]).logits, y[h], g[h], 9)
        stats.append(torch.cat([s_, c_]).detach())
    mean_stats = (stats[0] + stats[1]) / 2
    for h in halves:
        w = _Linear(4, 3)
        opt = torch.optim.SGD(w.parameters(), lr=0.1)
        _, _, q_worker = group_dro_step(w, TorchStepper(w, opt, None), x[h], y[h], g[h], q0, 0.5,
                                        reduce=lambda _: mean_stats)  # fmt: skip
        np.testing.assert_allclose(q_worker.numpy(), q1, rtol=1e-5)


def test_worst_group_accuracy_on_logits_matches_the_scoring_metric():
    from prism_ray.training.classifier import group_ids, worst_group_accuracy

    rng = np.random.default_rng(6)
    y = (rng.random((60, 3)) < 0.5).astype(np.float32)
    y[rng.random((60, 3)) < 0.15] = np.nan
    logits = rng.normal(size=(60, 3)).astype(np.float32)
    g = group_ids(y, [1])  # effusion's accuracy per effusion label x devices (0, 1, ?)
    got = worst_group_accuracy(torch.as_tensor(logits), torch.as_tensor(y), torch.as_tensor(g), 3, head=0)
    known = np.isfinite(y[:, 0])
    p = 1 / (1 + np.exp(-logits[known, 0]))
    assert got.item() == pytest.approx(cm.worst_group_accuracy(y[known, 0], p, g[known]), abs=1e-6)
    none = np.full((4, 1), np.nan, np.float32)
    assert math.isnan(
        worst_group_accuracy(torch.zeros(4, 1), torch.as_tensor(none), torch.zeros(4, dtype=torch.long), 1, 0)
    )


def test_group_settings_are_checked_against_the_heads():
    from prism_ray.config import ConfigError, build_config
    from prism_ray.pipelines.classifier import ClassifierConfig

    def config(**train):
        return build_config(ClassifierConfig, {
            "data": {"manifest": "m.parquet"}, "heads": {"effusion": "Pleural Effusion", "devices": "Support Devices"},
            "train": train, "run": {"storage_path": "/tmp/x", "name": "n"},
        })  # fmt: skip

    c = config(group_heads=["devices", "effusion"], select="valid_worst_group", select_head="devices")
    assert c.group_columns() == (1, 0) and c.select_column() == 1
    for train, message in (
        ({"balance": "groups"}, "'train.group_heads': balance: groups needs"),
        (
            {"objective": "group_dro", "select": "valid_worst_group"},
            "objective: group_dro, select: valid_worst",
        ),
        ({"group_heads": ["effusion", "sex"]}, "'train.group_heads': 'sex' is not one of the heads"),
        ({"group_heads": ["effusion"], "select_head": "sex"}, "'train.select_head': 'sex'"),
        ({"group_heads": ["effusion", "effusion"]}, "duplicates"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            config(**train)


def test_build_classifier_defaults_still_load_the_shipped_weights():
    from prism_ray.models.classifier import build_classifier, classifier_labels, load_classifier
    from prism_ray.models.loading import resolve_model_root

    shipped = load_classifier(resolve_model_root("tiny"))
    fresh = build_classifier()
    fresh.load_state_dict(shipped.state_dict())  # same architecture as before the extension
    assert classifier_labels(fresh) == classifier_labels(shipped)


def test_deepspeed_config_is_plain_data_parallel():
    from prism_ray.config import build_config
    from prism_ray.pipelines.classifier import ClassifierConfig, deepspeed_config

    c = build_config(
        ClassifierConfig,
        {
            "data": {"manifest": "m.parquet"},
            "heads": {"a": "A"},
            "train": {"batch_size": 8, "max_grad_norm": 2.0},
            "compute": {"num_workers": 3, "strategy": "deepspeed"},
            "run": {"storage_path": "/tmp/x", "name": "n"},
        },
    )
    ds = deepspeed_config(c)
    assert (
        ds["train_batch_size"] == 24
        and ds["gradient_clipping"] == 2.0
        and ds["zero_optimization"]["stage"] == 0
    )


# --- the job, in this process ------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from prism_ray.phantom.dataset import PhantomDatasetConfig, write_phantom_dataset

    return write_phantom_dataset(
        str(tmp_path_factory.mktemp("phantoms")), PhantomDatasetConfig(n_subjects=160, seed=3, p_effusion=0.5)
    )


def test_classifier_job_learns_exports_and_resumes(phantoms, tmp_path):
    import pyarrow.parquet as pq

    from prism_ray.config import build_config
    from prism_ray.data.storage import read_image
    from prism_ray.models.classifier import classifier_labels, load_classifier, predict_proba
    from prism_ray.pipelines.classifier import ClassifierConfig, in_process, run

    torch.set_num_threads(1)
    base = {
        "data": {"manifest": phantoms.manifest_uri},
        "heads": {"pleural_effusion": "Pleural Effusion", "female": "Sex=Female"},
        "train": {
            "max_steps": 40,
            "batch_size": 16,
            "eval_every": 20,
            "log_every": 20,
            "checkpoint_every": 20,
        },
        "run": {"storage_path": str(tmp_path), "name": "clf"},
    }
    result = run(build_config(ClassifierConfig, base), runner=in_process)
    assert result.final_step == 40 and result.best_step in (20, 40)
    model = load_classifier(result.model_path)
    assert classifier_labels(model) == ["pleural_effusion", "female"]
    test = pq.read_table(phantoms.manifest_uri).to_pylist()
    test = [r for r in test if r["split"] == "test"]
    probs = predict_proba(model, np.stack([read_image(r["image_uri"]) for r in test]))
    y = np.array([r["Pleural Effusion"] for r in test])
    assert cm.auroc(y, probs[:, 0]) > 0.85  # effusion is learnt (chance 0.5)

    more = dict(base, train=dict(base["train"], max_steps=60))
    resumed = run(build_config(ClassifierConfig, more), runner=in_process)
    assert resumed.final_step == 60
    from prism_ray.training.classifier import read_classifier_checkpoint

    assert read_classifier_checkpoint(resumed.checkpoint_path, "trainer_state.json")["start_step"] == 40


def test_classifier_job_group_dro_selects_by_worst_group_and_resumes_its_q(phantoms, tmp_path, capsys):
    """Group-balanced sampling + Group DRO over effusion x devices, best weights by the validation worst-group
    accuracy; a run stopped at step 20 and resumed ends with the q and weights of a straight run."""
    import re

    from prism_ray.config import build_config
    from prism_ray.pipelines.classifier import ClassifierConfig, in_process, run
    from prism_ray.training.callbacks import STATE_FILE
    from prism_ray.training.classifier import BEST_FILE, read_classifier_checkpoint

    torch.set_num_threads(1)
    base = {
        "data": {"manifest": phantoms.manifest_uri},
        "heads": {"pleural_effusion": "Pleural Effusion", "support_devices": "Support Devices"},
        "train": {
            "max_steps": 30, "batch_size": 16, "eval_every": 10, "log_every": 10, "checkpoint_every": 10,
            "patience": None, "balance": "groups", "objective": "group_dro", "dro_step_size": 0.5,
            "group_heads": ["pleural_effusion", "support_devices"], "select": "valid_worst_group",
        },
        "run": {"storage_path": str(tmp_path), "name": "straight"},
    }  # fmt: skip
    capsys.readouterr()
    straight = run(build_config(ClassifierConfig, base), runner=in_process)
    out = capsys.readouterr().out
    assert "training rows per group {'pleural_effusion=0,support_devices=0'" in out
    worst = {
        int(s): float(v) for s, v in re.findall(r"step (\d+) valid_loss \S+ valid_worst_group (\S+)", out)
    }
    assert sorted(worst) == [10, 20, 30]
    assert straight.select == "valid_worst_group" and straight.best_valid_worst_group == pytest.approx(
        max(worst.values()), abs=1e-3
    )
    assert straight.best_step == max(worst, key=lambda s: (worst[s], -s))  # the first of the highest
    q = read_classifier_checkpoint(straight.checkpoint_path, STATE_FILE)["group_dro_q"]
    assert len(q) == 9 and sum(q) == pytest.approx(1.0) and max(q) > 0.25 + 0.01  # moved off uniform
    assert sum(v > 0 for v in q) == 4  # the 4 groups of the training rows; no unknown labels

    half = dict(base, train=dict(base["train"], max_steps=20), run=dict(base["run"], name="resumed"))
    run(build_config(ClassifierConfig, half), runner=in_process)
    resumed = run(build_config(ClassifierConfig, dict(half, train=base["train"])), runner=in_process)
    state = read_classifier_checkpoint(resumed.checkpoint_path, STATE_FILE)
    assert state["start_step"] == 20
    np.testing.assert_allclose(state["group_dro_q"], q, rtol=1e-5)
    assert resumed.best_step == straight.best_step
    a = read_classifier_checkpoint(straight.checkpoint_path, BEST_FILE)
    b = read_classifier_checkpoint(resumed.checkpoint_path, BEST_FILE)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
