"""checkpoints.py's --resume rule: every flag as the checkpoint recorded it, except the few that may change
(MAY_CHANGE_ON_RESUME); a flag added later is protected without being listed; checkpoints written before a flag
existed resume at its default. On a two-weight model, no trainer (tests/test_train_*.py resume real runs).

    python -m pytest -q tests/test_checkpoints.py
"""
import json
import os

import pytest
import torch

import checkpoints

# a trainer's config as vars(args) gives it, with a flag someone added after this file was written
CONFIG = {"pretrained": "base", "data": "likes", "out_dir": "run", "max_steps": 10, "beta": 5000.0, "lr": 1e-5,
          "resume": False, "micro_batch": 2, "log_every": 10, "save_every": 100, "val_every": 100,
          "a_flag_added_later": 1}
DEFAULTS = {**CONFIG, "data": None, "out_dir": None, "a_flag_added_later": 1}


def saved_run(folder, config):
    """One AdamW step on a Linear(2, 1) and its checkpoint at step 1 in `folder`; returns the model's weights."""
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    checkpoints.save_checkpoint(str(folder), 1, model.state_dict(), optimizer, config)
    return model.state_dict()


def resume(folder, config, defaults=DEFAULTS):
    """--resume with `config`: (step, weights) or SystemExit with the one line it stops with."""
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return checkpoints.resume(str(folder), optimizer, config, defaults, say=lambda *a: None)


def test_allowed_flags_may_change_and_every_other_stops_with_one_line(tmp_path):
    weights = saved_run(tmp_path, CONFIG)
    later = {**CONFIG, "resume": True, "max_steps": 20, "out_dir": "moved", "micro_batch": 1, "log_every": 1,
             "save_every": 5, "val_every": -1}
    step, resumed = resume(tmp_path, later)
    assert step == 1 and all(torch.equal(weights[k], resumed[k]) for k in weights)
    assert {"max_steps", "out_dir", "resume", "micro_batch", "log_every", "save_every", "val_every"} <= set(
        checkpoints.MAY_CHANGE_ON_RESUME)
    # a flag no list names is protected: the message names it with both values, on one line
    with pytest.raises(SystemExit) as stop:
        resume(tmp_path, {**later, "a_flag_added_later": 2})
    message = str(stop.value)
    assert "\n" not in message and "--a_flag_added_later (1 there, 2 now)" in message
    assert "max_steps" not in message and "log_every" not in message  # what may change is not reported
    with pytest.raises(SystemExit, match=r"--beta \(5000.0 there, 100.0 now\), --lr \(1e-05 there, 0.001 now\)"):
        resume(tmp_path, {**later, "beta": 100.0, "lr": 1e-3})


def test_a_checkpoint_from_before_a_flag_resumes_at_its_default(tmp_path):
    """A checkpoint written by older code has no value for a flag added since: it ran as the flag's default does,
    so the flag at its default resumes and any other value stops. A flag since removed stops too."""
    saved_run(tmp_path, CONFIG)
    [folder] = [d for d in os.listdir(tmp_path / "checkpoints") if d.startswith("step_")]
    path = tmp_path / "checkpoints" / folder / "state.json"  # not among the hashed files: an edit keeps it good
    state = json.loads(path.read_text())
    del state["config"]["a_flag_added_later"]
    path.write_text(json.dumps(state))
    assert resume(tmp_path, {**CONFIG, "resume": True})[0] == 1  # at its default, 1
    with pytest.raises(SystemExit, match=r"--a_flag_added_later \(not recorded there: written before the flag, as "
                                         r"its default 1; 3 now\)"):
        resume(tmp_path, {**CONFIG, "a_flag_added_later": 3})
    state["config"]["a_flag_removed_since"] = "x"
    path.write_text(json.dumps(state))
    with pytest.raises(SystemExit, match=r"--a_flag_removed_since \(x there, no such flag now\)"):
        resume(tmp_path, CONFIG)


def test_every_flag_that_may_change_is_a_flag_of_both_trainers():
    """A misspelt name in MAY_CHANGE_ON_RESUME would protect the flag it meant (safe, but not what it says)."""
    import train_dpo
    import train_kto
    for trainer in (train_dpo, train_kto):
        flags = set(vars(trainer.parser.parse_args(["--data", "d", "--out_dir", "o"])))
        assert set(checkpoints.MAY_CHANGE_ON_RESUME) <= flags, set(checkpoints.MAY_CHANGE_ON_RESUME) - flags
