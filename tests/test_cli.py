import subprocess
import sys

import torch
from tiny import tiny_bert

from kd_plugins.cli import main


def test_losses_listing(capsys):
    assert main(["losses", "--kind", "logits"]) == 0
    out = capsys.readouterr().out
    assert "kl " in out and "jsd" in out and "hidden_mse" not in out


def test_unknown_command_and_help(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main(["--help"]) == 0


def test_inherit_command(tmp_path):
    from transformers import AutoModel

    teacher = tiny_bert("BertModel", layers=4)
    teacher.save_pretrained(tmp_path / "t")
    assert main(["inherit", str(tmp_path / "t"), str(tmp_path / "s"), "--strategy", "0,3"]) == 0
    s = AutoModel.from_pretrained(tmp_path / "s")
    assert s.config.num_hidden_layers == 2
    torch.testing.assert_close(s.encoder.layer[1].output.dense.weight, teacher.encoder.layer[3].output.dense.weight)


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "kd_plugins.cli", "losses"], capture_output=True, text=True)
    assert r.returncode == 0 and "dkd" in r.stdout
