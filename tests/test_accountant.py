"""The persistent per-site RDP accountant and the budget check."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import RDPAccountant

from facefed.common.accountant import AccountantMismatch, BudgetExceeded, SiteAccountant


def test_epsilon_matches_opacus_rdp(tmp_path):
    acc = SiteAccountant(tmp_path / "acc.json", 1e-5, 100.0)
    ref = RDPAccountant()
    for sigma, q, steps in [(1.1, 0.05, 30), (0.9, 0.1, 12)]:
        acc.record(sigma, q, steps)
        ref.history.append((sigma, q, steps))
    assert acc.epsilon() == pytest.approx(ref.get_epsilon(1e-5), rel=2e-2)


def test_state_survives_a_restart_and_epsilon_only_grows(tmp_path):
    path = tmp_path / "site" / "acc.json"
    acc = SiteAccountant(path, 1e-5, 100.0)
    assert acc.epsilon() == 0.0
    seen = []
    for _ in range(3):
        acc = SiteAccountant(path, 1e-5, 100.0)  # a fresh process for every round
        acc.record(1.0, 0.1, 20, label="round")
        seen.append(SiteAccountant(path, 1e-5, 100.0).epsilon())
    assert seen[0] > 0 and seen[0] < seen[1] < seen[2]
    assert SiteAccountant(path, 1e-5, 100.0).steps == 60
    assert json.loads(path.read_text())["accountant"] == "rdp"


def test_budget_refuses_before_and_changes_nothing(tmp_path):
    path = tmp_path / "acc.json"
    acc = SiteAccountant(path, 1e-5, 8.0)
    acc.record(1.0, 0.1, 20)
    before, spent = path.read_bytes(), acc.epsilon()
    with pytest.raises(BudgetExceeded) as e:
        acc.plan(1.0, 0.1, 500)
    msg = str(e.value)
    assert 0 < spent < 8.0 < e.value.planned and e.value.spent == pytest.approx(spent)
    assert f"spent so far {spent:.3f}, remaining {8.0 - spent:.3f}" in msg and "max_epsilon 8" in msg
    assert path.read_bytes() == before and acc.epsilon() == spent
    assert acc.plan(5.0, 0.1, 10) < 8.0  # a small, noisy plan still fits


def test_noise_calibration_lands_on_the_target(tmp_path):
    acc = SiteAccountant(tmp_path / "acc.json", 1e-5, 8.0)
    sigma = acc.noise_for(4.0, 0.1, 200)
    assert 3.9 < acc.projected(sigma, 0.1, 200) <= 4.0
    acc.record(sigma, 0.1, 200)
    sigma2 = acc.noise_for(8.0, 0.1, 200)  # the second half of the budget
    assert 7.9 < acc.projected(sigma2, 0.1, 200) <= 8.0


def test_unit_and_delta_are_fixed_per_site(tmp_path):
    path = tmp_path / "acc.json"
    SiteAccountant(path, 1e-5, 8.0, "person").record(1.0, 0.1, 5)
    with pytest.raises(AccountantMismatch, match="counts per person"):
        SiteAccountant(path, 1e-5, 8.0, "image")
    with pytest.raises(AccountantMismatch, match="delta"):
        SiteAccountant(path, 1e-6, 8.0, "person")
    path.write_text("{}")
    with pytest.raises(AccountantMismatch, match="not a facefed accountant"):
        SiteAccountant(path, 1e-5, 8.0)
