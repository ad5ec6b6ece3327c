"""A process killed (SIGKILL) in the middle of a save leaves the previous adapter / checkpoint whole and loadable.

The saving process is a real subprocess whose safetensors writes are slowed down (written in small pieces with
pauses) so that the kill lands mid-file; it prints a marker when the slow write begins.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model_state_dict
from transformers import AutoModelForCausalLM

from qft.models import load_adapter
from qft.train import FinetuneConfig, finetune

REPO = Path(__file__).resolve().parents[1]
MARKER = "qft-test: slow write begins"


def _slow_safetensors(from_call: int):
    """Make peft's safetensors writes slow from the ``from_call``-th one on (0-based)."""
    import peft.peft_model
    from safetensors.torch import save

    real, calls = peft.peft_model.safe_save_file, [0]

    def slow(tensors, filename, metadata=None):
        calls[0] += 1
        if calls[0] <= from_call:
            return real(tensors, filename, metadata=metadata)
        data = save(tensors, metadata=metadata)
        print(MARKER, flush=True)
        with open(filename, "wb") as f:
            for i in range(0, len(data), 256):
                f.write(data[i:i + 256])
                f.flush()
                time.sleep(0.05)

    peft.peft_model.safe_save_file = slow


def worker_publish(model_dir: str, out: str):
    """Publish adapter v1 (fast), then v2 (slow, to be killed) into the same folder, as finetune does."""
    from peft import LoraConfig, get_peft_model

    from qft.io import publishing

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with publishing(Path(out)) as staging:
        model.save_pretrained(staging)
    print("qft-test: v1 published", flush=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(1.0)
    _slow_safetensors(from_call=0)
    with publishing(Path(out)) as staging:
        model.save_pretrained(staging)
    print("qft-test: v2 published (the kill came too late)", flush=True)


def worker_checkpoints(model_dir: str, data: str, out: str):
    """Train with a checkpoint every step; the second checkpoint's write is slow (and gets killed)."""
    _slow_safetensors(from_call=1)
    finetune(FinetuneConfig(model=model_dir, data=data, output=out, max_steps=4, save_steps=1, batch_size=4),
             log=lambda m: None, progress=False)


def run_and_kill(call: str, timeout: float = 120) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-c", f"import tests.test_atomic as t; t.{call}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.time() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if MARKER in line:
                time.sleep(0.3)  # some pieces of the file are on disk now
                proc.send_signal(signal.SIGKILL)
                break
            assert time.time() < deadline, "".join(lines)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    return "".join(lines)


def test_killed_publish_keeps_the_previous_adapter(tiny_model_dir, tmp_path):
    out = tmp_path / "adapter"
    log = run_and_kill(f"worker_publish({str(tiny_model_dir)!r}, {str(out)!r})")
    assert "v1 published" in log and "v2 published" not in log
    # the half-written v2 is in a hidden staging folder beside the adapter; the adapter itself is v1, whole
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".adapter.staging-")]
    assert partial and any(f.stat().st_size > 0 for f in partial[0].rglob("*.safetensors"))
    model = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    torch.manual_seed(0)
    from peft import LoraConfig, get_peft_model

    v1 = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    expected, loaded = get_peft_model_state_dict(v1), get_peft_model_state_dict(model)
    assert expected.keys() == loaded.keys()
    for k in expected:
        assert torch.equal(expected[k], loaded[k]), k


def test_killed_checkpoint_save_keeps_the_previous_checkpoint(tiny_model_dir, jsonl, tmp_path):
    out, data = tmp_path / "run", jsonl("text")
    run_and_kill(f"worker_checkpoints({str(tiny_model_dir)!r}, {str(data)!r}, {str(out)!r})")
    ckpts = out / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir() if p.name.startswith(("checkpoint", ".checkpoint")))
    assert len(names) == 2 and names[0].startswith(".checkpoint-2.partial-") and names[1] == "checkpoint-1", names
    # checkpoint-1 is whole: --resume auto picks it (the partial one is invisible) and the run finishes
    result = finetune(FinetuneConfig(model=str(tiny_model_dir), data=str(data), output=str(out), max_steps=4,
                                     save_steps=1, batch_size=4, resume="auto"), log=lambda m: None, progress=False)
    assert result.stats["steps"] == 4
    assert (ckpts / "checkpoint-4" / "trainer_state.json").exists()


def test_atomic_writes_get_the_mode_of_any_new_file(tmp_path):
    """write_json_atomic goes through mkstemp, whose files are 0600; the result gets open()'s mode under the umask
    (0644 under the usual 022), so a results JSON or a run record is as readable as every other file written."""
    import qft.io

    qft.io.write_json_atomic(tmp_path / "r.json", {"a": 1})
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    assert qft.io.NEW_FILE_MODE == qft.io._new_file_mode()  # the umask has not changed since import
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == qft.io.NEW_FILE_MODE


def test_published_files_get_the_mode_of_any_new_file(tmp_path):
    """An adapter or checkpoint folder is published file by file from a staging folder; each file gets open()'s
    mode under the umask, whatever mode its writer gave it (safetensors' own temporary files are 0600)."""
    import qft.io

    staging = qft.io.staging_dir(tmp_path / "adapter")
    (staging / "adapter_model.safetensors").write_bytes(b"x")
    os.chmod(staging / "adapter_model.safetensors", 0o600)
    qft.io.publish_dir_atomic(staging, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_mode & 0o777 == qft.io.NEW_FILE_MODE
