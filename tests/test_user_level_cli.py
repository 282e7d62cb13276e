"""`dpft train --privacy-unit user --user-column COL` (CSV), summary.json's unit of ε."""

from __future__ import annotations

import json

import pytest

from app_helpers import BAD, GOOD, HAVE_PANDAS, HAVE_TRANSFORMERS, make_tiny_bert, run_cli, tiny_args

pytestmark = pytest.mark.skipif(not (HAVE_TRANSFORMERS and HAVE_PANDAS), reason="needs transformers and pandas")


def _csv(path, with_user: bool = True) -> str:
    rows = []
    for k in range(12):  # 12 authors, 8 snippets each
        for j in range(8):
            good = (k + j) % 2 == 0
            rows.append(((GOOD if good else BAD)[j % 5], int(good), f"author{k}"))
    head = "text,label,author\n" if with_user else "text,label\n"
    path.write_text(head + "".join(f"{t},{y},{u}\n" if with_user else f"{t},{y}\n" for t, y, u in rows))
    return str(path)


def test_train_user_level_csv(tmp_path, capsys):
    model = make_tiny_bert(tmp_path / "bert")
    data = _csv(tmp_path / "reviews.csv")
    out = tmp_path / "run"
    argv = tiny_args(model, data, out, "--privacy-unit", "user", "--user-column", "author", "--dp-seed", "3")
    argv[argv.index("--batch-size") + 1] = "4"  # users per step
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["privacy_unit"] == "user" and s["users"] == 12
    assert s["epsilon_unit"] == "all training examples of one user (author)"
    # 12 authors in all, 20 % of the rows held out for evaluation: the users are those of the training rows
    assert s["sample_rate"] == pytest.approx(4 / 12)
    assert s["steps"] == 3  # ceil(12 users / 4) per epoch
    assert "(protects all training examples of one user (author))" in stdout
    assert "privacy unit: user (author): 12 users" in stdout
    privacy = json.loads((out / "release" / "privacy.json").read_text())
    assert privacy["privacy_unit"].startswith("user: all the training examples of one author value")
    assert "with respect to one user: all the training examples" in (out / "release" / "README.md").read_text()


def test_train_user_level_sparta(tmp_path, capsys, monkeypatch):
    """SPARTA at user level: its scoring and training phases sample users, every
    physical chunk tells the phase's engine whose examples it holds, one ledger."""
    from dpft.engine import PrivacyEngine

    told = []
    real = PrivacyEngine.set_units

    def spy(self, ids):
        told.append((self.privacy_unit, len(ids)))
        return real(self, ids)

    monkeypatch.setattr(PrivacyEngine, "set_units", spy)
    model = make_tiny_bert(tmp_path / "bert")
    data = _csv(tmp_path / "reviews.csv")
    out = tmp_path / "run"
    argv = tiny_args(
        model,
        data,
        out,
        "--method",
        "sparta",
        "--scoring-epochs",
        "1",
        "--privacy-unit",
        "user",
        "--user-column",
        "author",
        "--dp-seed",
        "3",
    )
    argv[argv.index("--batch-size") + 1] = "4"  # users per step
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["privacy_unit"] == "user" and s["users"] == 12 and s["sample_rate"] == pytest.approx(4 / 12)
    assert s["epsilon"] <= s["target_epsilon"] + 1e-9
    assert "SPARTA: scored the rows privately (3 steps" in stdout  # ceil(12 users / 4): steps count users
    assert told and all(unit == "user" for unit, _ in told)  # scoring and training engines, per chunk
    assert sum(k for _, k in told) > 0


def test_train_user_level_needs_a_user_column(tmp_path, capsys):
    model = make_tiny_bert(tmp_path / "bert")
    data = _csv(tmp_path / "reviews.csv", with_user=False)
    code, _, err = run_cli(tiny_args(model, data, tmp_path / "run", "--privacy-unit", "user"), capsys)
    assert code != 0 and "--user-column" in err and "Traceback" not in err
    code, _, err = run_cli(
        tiny_args(model, data, tmp_path / "run2", "--privacy-unit", "user", "--user-column", "author"), capsys
    )
    assert code != 0 and "no column 'author'" in err and "Traceback" not in err
    code, _, err = run_cli(tiny_args(model, data, tmp_path / "run3", "--user-column", "author"), capsys)
    assert code != 0 and "--user-column needs --privacy-unit user" in err


def test_rotten_tomatoes_has_movies_as_users():
    from dpft.app import offline

    try:
        task = offline.load_task("rotten-tomatoes", user_column="movie_name")
    except offline.DataUnavailable as e:
        pytest.skip(str(e))
    assert len(task.u_train) == len(task.y_train) and task.user_column == "movie_name"
    movies = set(task.u_train)
    assert 100 < len(movies) < len(task.u_train)
    sub = task.subset(300, 50, seed=1)
    assert len(sub.u_train) == 300 and set(sub.u_train) <= movies
    val = task.validation_split(100, seed=0)
    assert len(val.u_train) == len(val.y_train)
    with pytest.raises(offline.DataUnavailable, match="one user column, movie_name"):
        offline.load_task("rotten-tomatoes", user_column="critic")


def test_user_level_defaults_and_refusals():
    from dpft.app.config import ConfigError, TrainConfig, validate

    validate(TrainConfig(privacy_unit="user", method="sparta"))  # supported
    with pytest.raises(ConfigError, match="--no-poisson"):
        validate(TrainConfig(privacy_unit="user", poisson=False))
    with pytest.raises(ConfigError, match="unknown privacy unit"):
        validate(TrainConfig(privacy_unit="person"))
