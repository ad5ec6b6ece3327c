"""MeZO: the seed trick, perturbed forwards, ZO-SGD in the transformers Trainer, bit-exact resume."""

import copy

import pytest
import torch
from transformers import TrainingArguments

from qft.zo.optimizer import ZoSGD
from qft.errors import QftError
from qft.zo.spsa import apply_update_, direction, perturb_inplace_, perturbed, perturbed_pair, tensor_seed
from qft.zo.trainer import ZoArguments, ZoTrainer, zo_projected_grad
from tests.tiny import tiny_inputs, tiny_model


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_directions_are_reproducible_and_distinct():
    p = torch.empty(64, 32)
    assert torch.equal(direction(p, 5, 0), direction(p, 5, 0))
    assert not torch.equal(direction(p, 5, 0), direction(p, 5, 1))
    assert not torch.equal(direction(p, 5, 0), direction(p, 6, 0))
    z = direction(torch.empty(1000, 100), 1, 0)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01


@pytest.fixture(params=["whole", "pieces"])
def chunking(request, monkeypatch):
    """Run a test with z drawn whole, and again split into pieces of 1000 elements."""
    if request.param == "pieces":
        monkeypatch.setattr("qft.zo.spsa.CHUNK", 1000)
    return request.param


def test_perturbed_reuses_its_layout_until_a_slot_changes():
    model = tiny_model("llama")
    x = tiny_inputs(model)
    params = _params(model)
    with torch.no_grad():
        with perturbed(model, params, step_seed=3, scale=1e-2):
            before = model(**x).logits
        layout = model.__dict__["_qft_zo_layout"]
        with perturbed(model, params, step_seed=3, scale=1e-2):
            again = model(**x).logits
        assert model.__dict__["_qft_zo_layout"] is layout and torch.equal(before, again)
        with perturbed(model, params, step_seed=3, scale=1e-2, dist="rank1"):  # another plan
            model(**x)
        assert model.__dict__["_qft_zo_layout"] is not layout
        # a tensor swapped into a slot (same list of params): the layout is rebuilt and the old tensor, no longer
        # used by any module, is reported unseen
        model.model.norm.weight = torch.nn.Parameter(model.model.norm.weight.detach().clone())
        with perturbed(model, params, step_seed=3, scale=1e-2) as seen:
            model(**x)
        assert len(seen) == len(params) - 1
        with perturbed(model, _params(model), step_seed=3, scale=1e-2) as seen:
            torch.testing.assert_close(model(**x).logits, before, rtol=0, atol=0)
        assert len(seen) == len(params)


@pytest.mark.parametrize("dist", ["gaussian", "rank1"])
def test_perturbed_forward_equals_inplace_reference_and_restores_exactly(chunking, dist):
    model = tiny_model("llama")
    x = tiny_inputs(model)
    params = _params(model)
    snapshot = [p.detach().clone() for p in params]
    with torch.no_grad():
        with perturbed(model, params, step_seed=3, scale=1e-2, dist=dist):
            ours = model(**x).logits
        for p, s in zip(params, snapshot):
            assert torch.equal(p, s)  # the stored weights never moved
        ref_model = copy.deepcopy(model)
        perturb_inplace_(_params(ref_model), 3, 1e-2, dist=dist)
        ref = ref_model(**x).logits
    # out-of-place p + eps*z (or the rank-one term added to each output) vs in-place add_(z, alpha=eps): the same
    # function, rounded differently (measured max diff 3.6e-7 for rank1)
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=1e-5)
    # MeZO's in-place round trip (+eps, -2eps, +eps) leaves floating-point residue; ours leaves none
    perturb_inplace_(_params(ref_model), 3, -2e-2, dist=dist)
    perturb_inplace_(_params(ref_model), 3, 1e-2, dist=dist)
    residue = max((a - b).abs().max().item() for a, b in zip(_params(ref_model), snapshot))
    assert residue > 0  # (measured ~1e-9: why qft perturbs inside the forward instead)


@pytest.mark.parametrize("dist", ["gaussian", "rank1"])
def test_projected_grad_matches_directional_derivative(dist):
    torch.manual_seed(0)
    model = tiny_model("llama").double()
    x = tiny_inputs(model)
    params = _params(model)
    ids = x["input_ids"]

    def loss_fn():  # transformers' loss upcasts to float32; keep float64 throughout here
        logits = model(**x).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    g, _ = zo_projected_grad(model, params, 11, 1e-5, loss_fn, dist=dist)
    loss_fn().backward()
    exact = sum((p.grad * direction(p, 11, i, dist=dist)).sum() for i, p in enumerate(params))
    # central differences: measured 1.4e-5 relative error at eps=1e-5 (rotary tables stay float32, so a smaller
    # eps makes it worse: 4e-4 at 1e-6); the tolerance is 5e-5. rank1: 6.9e-5 at 1e-5 and 7.7e-5 at 1e-4 (the same
    # float32 floor against a smaller directional derivative, 4.8), so 1e-4
    tol = 5e-5 if dist == "gaussian" else 1e-4
    assert abs(g.item() - exact.item()) <= tol * abs(exact.item())


@pytest.mark.parametrize("dist", ["gaussian", "rank1"])
def test_update_is_sgd_along_the_same_directions(chunking, dist):
    params = [torch.randn(70, 30), torch.randn(30)]
    before = [p.clone() for p in params]
    apply_update_(params, [(4, 0.5), (9, -2.0)], lr=0.1, weight_decay=0.01, decay_mask=[True, False],
                  bucket_bytes=1000, dist=dist)  # tiny buckets: exercise the bucketing
    for i, (p, b) in enumerate(zip(params, before)):
        decayed = b * (1 - 0.1 * 0.01) if i == 0 else b
        expected = decayed - 0.1 * (0.5 * direction(b, 4, i, dist=dist) - 2.0 * direction(b, 9, i, dist=dist))
        torch.testing.assert_close(p, expected, atol=1e-6, rtol=1e-6)


class _Repeat(torch.utils.data.Dataset):
    """One short sequence, repeated: a tiny problem a ZO method can make progress on."""

    def __init__(self, n=64):
        self.n = n
        self.ids = torch.tensor([5, 9, 17, 33, 65, 9, 17, 33, 65, 9, 17, 33])

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"input_ids": self.ids, "labels": self.ids.clone(), "attention_mask": torch.ones_like(self.ids)}


def _zo_trainer(tmp_path, max_steps, lr=3e-4, dist="gaussian", family="llama", **kw):
    model = tiny_model(family)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=lr, lr_scheduler_type="constant", logging_steps=10, report_to="none",
                             use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0, **kw)
    return ZoTrainer(model=model, args=args, train_dataset=_Repeat(), zo=ZoArguments(eps=1e-3, distribution=dist))


def _loss(model):
    x = _Repeat()[0]
    with torch.no_grad():
        return model(input_ids=x["input_ids"][None], labels=x["labels"][None]).loss.item()


def test_mezo_lowers_the_loss_in_the_trainer(tmp_path):
    trainer = _zo_trainer(tmp_path, max_steps=150)
    before = _loss(trainer.model)
    trainer.train()
    after = _loss(trainer.model)
    assert isinstance(trainer.optimizer.optimizer, ZoSGD)
    logged = [h for h in trainer.state.log_history if "projected_grad" in h]
    assert logged and all(h["projected_grad"] > 0 for h in logged)
    assert not any("grad_norm" in h for h in logged)  # no gradients, so the Trainer's norm scan is skipped
    from qft.robust import NanGuard

    guard = NanGuard()  # nor qft's NaN guard's gradient scan
    assert guard.gradients
    ZoTrainer(model=tiny_model("llama"), args=trainer.args, train_dataset=_Repeat(), callbacks=[guard])
    assert not guard.gradients
    n = trainer.model.num_parameters(exclude_embeddings=True)  # FLOPs of two forwards, 2·N a token each
    assert trainer.floating_point_ops({"input_ids": torch.ones(4, 16)}) == 4 * 64 * n
    # measured: 4.89 -> 3.76 in 150 steps at lr 3e-4 (1e-4: 4.40; 2e-3 diverges to 6.3); require a clear drop
    assert after < before - 0.5, (before, after)


def test_every_step_runs_with_dropout_off(tmp_path):
    """Both forwards of a step must see one function, so dropout is off in each step's forwards: also after a
    callback (an evaluation, say) puts the model back in training mode between steps. The step switches modes
    only when the model is in training mode (a walk over every module costs a small model's step 9 ms)."""
    from transformers import TrainerCallback

    trainer = _zo_trainer(tmp_path, max_steps=6)
    modes, evals = [], []
    trainer.model.register_forward_pre_hook(lambda m, a: modes.append(any(x.training for x in m.modules())))
    inner_eval = trainer.model.eval
    trainer.model.eval = lambda: evals.append(1) or inner_eval()

    class TrainAgain(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 3:
                model.train()

    trainer.add_callback(TrainAgain())
    trainer.model.train()  # in training mode from the start (from_pretrained gives eval mode)
    trainer.train()
    assert len(modes) == 12 and not any(modes)  # two forwards a step, none with a module in training mode
    assert len(evals) == 2  # at the first step and after the callback's train(), not at every step


def test_rank1_directions_train(tmp_path):
    trainer = _zo_trainer(tmp_path, max_steps=150, dist="rank1")
    before = _loss(trainer.model)
    trainer.train()
    # measured: 4.89 -> 3.65 in 150 steps (Gaussian 3.76, Rademacher 4.00)
    assert _loss(trainer.model) < before - 0.5


def test_rademacher_directions_train_too(tmp_path):
    """±1 directions (classic SPSA): the same estimator, E[zzᵀ] = I; the seed trick and the update use them."""
    z = direction(torch.empty(1000, 100), 1, 0, dist="rademacher")
    assert set(z.unique().tolist()) == {-1.0, 1.0} and abs(z.mean()) < 0.01
    params = [torch.randn(70, 30)]
    before = params[0].clone()
    apply_update_(params, [(4, 0.5)], lr=0.1, dist="rademacher")
    torch.testing.assert_close(params[0], before - 0.05 * direction(before, 4, 0, dist="rademacher"))
    trainer = _zo_trainer(tmp_path, max_steps=150, dist="rademacher")
    loss_before = _loss(trainer.model)
    trainer.train()
    # measured: 4.89 -> 4.00 in 150 steps (Gaussian: 3.76)
    assert _loss(trainer.model) < loss_before - 0.5
    with pytest.raises(Exception, match="unknown zo distribution"):
        ZoArguments(distribution="uniform")


def test_rank1_directions_are_isotropic():
    """z = u·vᵀ: E[vec(z) vec(z)ᵀ] = I, the property that keeps the SPSA estimate unbiased."""
    p = torch.empty(3, 2)
    zs = torch.stack([direction(p, s, 0, dist="rank1").reshape(-1) for s in range(20000)])
    second = zs.T @ zs / len(zs)
    torch.testing.assert_close(second, torch.eye(6), atol=0.06, rtol=0)  # measured max deviation 0.03
    assert torch.linalg.matrix_rank(direction(torch.empty(40, 30), 1, 0, dist="rank1")) == 1
    assert direction(torch.empty(30), 1, 0, dist="rank1").std() > 0.9  # vectors: dense Gaussian


def _gpt2():
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                                       n_positions=64)).eval()


def _tied_llama():
    model = tiny_model("llama")
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("make", [_tied_llama, lambda: tiny_model("opt"), _gpt2], ids=["llama-tied", "opt", "gpt2"])
def test_rank1_matrices_take_no_copy_and_match_the_reference(make, monkeypatch):
    """Linear, embedding (tied to the LM head) and GPT-2 Conv1D matrices get the rank-one term from forward hooks:
    no perturbed copy of them is made (only of OPT's positional embedding, an Embedding subclass with its own
    forward), and the outputs equal the in-place reference."""
    import qft.zo.spsa as spsa
    from qft.zo.lowrank import hook_kind

    model = make()
    own_forward = [p for m in model.modules() for n, p in m.named_parameters(recurse=False)
                   if p.dim() == 2 and hook_kind(m, n) is None]
    x = tiny_inputs(model)
    params = _params(model)
    copied = []
    real = spsa.perturbed_copies
    monkeypatch.setattr(spsa, "perturbed_copies",
                        lambda ps, *a, **k: copied.extend(p.dim() for p in ps) or real(ps, *a, **k))
    with torch.no_grad():
        with perturbed(model, params, 8, 1e-2, dist="rank1") as seen:
            ours = model(**x).logits
        assert len(seen) == len(params) and copied and copied.count(2) == len(own_forward)
        ref = copy.deepcopy(model)
        perturb_inplace_(_params(ref), 8, 1e-2, dist="rank1")
        torch.testing.assert_close(ours, ref(**x).logits, atol=2e-6, rtol=1e-5)


def test_rank1_factors_are_drawn_once_a_step(monkeypatch):
    """Both forwards and the update of a step reuse each matrix's u, v (one draw each); the next step draws anew
    and the previous step's are dropped; the update equals one drawn without the step cache."""
    import qft.zo.lowrank as lowrank

    model = tiny_model("llama")
    x = tiny_inputs(model)
    params = _params(model)
    matrices = sum(p.dim() == 2 for p in params)
    draws = []
    real = lowrank._draw
    monkeypatch.setattr(lowrank, "_draw", lambda p, seed, dtype: draws.append(seed) or real(p, seed, dtype))
    reference = copy.deepcopy(model)
    loss_fn = lambda: model(**x, labels=x["input_ids"]).loss  # noqa: E731
    for step_seed in (5, 6):
        draws.clear()
        g, _ = zo_projected_grad(model, params, step_seed, 1e-3, loss_fn, dist="rank1")
        apply_update_(params, [(step_seed, g.item())], lr=1e-2, dist="rank1")
        assert len(draws) == len(set(draws)) == matrices
        assert len(lowrank._STEP["factors"]) == matrices and lowrank._STEP["step"] == step_seed
        for i, p in enumerate(_params(reference)):  # the same update, factors drawn afresh (no step)
            if p.dim() == 2:
                with torch.no_grad():
                    p.addr_(*lowrank.factors(p, tensor_seed(step_seed, i)), alpha=-1e-2 * g.item())
                assert torch.equal(p, params[i])


def test_rank1_hooks_under_autocast():
    """Under bf16 autocast a float32 model's linear layers take float32 inputs and give bf16 outputs: the hooks then
    keep float32 factors and cast as they go, and the output matches the in-place reference to bf16 precision."""
    import qft.zo.lowrank as lowrank

    model = tiny_model("llama")
    x = tiny_inputs(model)
    params = _params(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        base = model(**x).logits.float()
        with perturbed(model, params, 4, 1e-1, dist="rank1"):
            ours = model(**x).logits.float()
        assert torch.float32 in {key[3] for key in lowrank._STEP["factors"]}
        ref = copy.deepcopy(model)
        perturb_inplace_(_params(ref), 4, 1e-1, dist="rank1")
        theirs = ref(**x).logits.float()
    # the perturbation moves the logits far more than bf16 rounding separates the two ways of applying it
    # (measured: 2.49 against 0.065)
    assert (ours - theirs).abs().max() < (base - theirs).abs().max() / 4


def test_rank1_under_a_mask_is_materialized_and_masked():
    model = tiny_model("llama")
    x = tiny_inputs(model)
    params = _params(model)
    mask_fn = lambda w: w.abs() < 0.02  # noqa: E731  (Sparse-MeZO's kind of mask)
    with torch.no_grad():
        with perturbed(model, params, 2, 1e-2, mask_fn, dist="rank1"):
            ours = model(**x).logits
        ref = copy.deepcopy(model)
        perturb_inplace_(_params(ref), 2, 1e-2, mask_fn, dist="rank1")
        torch.testing.assert_close(ours, ref(**x).logits, atol=2e-6, rtol=1e-5)
    w = params[1]  # a projection matrix
    z = direction(w, 2, 1, mask_fn, dist="rank1")
    assert torch.equal(z[~mask_fn(w)], torch.zeros_like(z[~mask_fn(w)])) and z.abs().sum() > 0
    before = w.detach().clone()
    apply_update_(params, [(2, 1.0)], lr=0.1, mask_fn=mask_fn, dist="rank1")
    torch.testing.assert_close(w, before - 0.1 * z)


@pytest.mark.parametrize("dist", ["gaussian", "rank1"])
def test_resume_is_bit_exact(tmp_path, dist):
    full = _zo_trainer(tmp_path / "full", max_steps=6, dist=dist)
    full.train()
    first = _zo_trainer(tmp_path / "part", max_steps=6, save_steps=3, dist=dist)
    first.args.save_strategy = "steps"
    first.train()
    resumed = _zo_trainer(tmp_path / "part", max_steps=6, dist=dist)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-3"))
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n



@pytest.mark.parametrize("dist", ["gaussian", "rank1"])
def test_a_checkpoints_optimizer_state_alone_rebuilds_its_weights(tmp_path, dist):
    """The seed trick: a checkpoint's optimizer.pt (seeds, projected gradients, learning rates: a few numbers a step)
    replayed onto the starting weights gives the checkpoint's weights bit-exactly, under a decaying schedule with
    weight decay; the rebuilt optimizer goes on from the same step."""
    trainer = _zo_trainer(tmp_path, max_steps=6, save_steps=6, dist=dist, weight_decay=0.1)
    trainer.args.save_strategy, trainer.args.lr_scheduler_type = "steps", "linear"
    start = copy.deepcopy(trainer.model)
    trainer.train()
    state = torch.load(tmp_path / "checkpoint-6" / "optimizer.pt", weights_only=True)
    history = state["zo"]["history"]
    assert [e["t"] for e in history] == list(range(6)) and len({e["groups"][0][0] for e in history}) == 6
    opt = ZoSGD(_params(start), lr=0.0, weight_decay=0.1, seed=0, dist=dist)
    opt.replay(history)
    for (n, a), (_, b) in zip(trainer.model.named_parameters(), start.named_parameters()):
        assert torch.equal(a, b), n
    assert opt.step_seed() == trainer.optimizer.optimizer.step_seed() and opt.zo_state["t"] == 6
    from qft.errors import QftError

    other = "gaussian" if dist == "rank1" else "rank1"
    with pytest.raises(QftError, match=f"drawn with --zo-distribution {dist}, not {other}"):
        ZoSGD(_params(copy.deepcopy(start)), dist=other).replay(history)
    with pytest.raises(QftError, match="same --model and method options"):
        ZoSGD(_params(start)[:-1], dist=dist).replay(history)


def test_replay_with_a_mask_and_several_directions():
    """Sparse-MeZO's masks are recomputed from the weights at every step of the replay, as in training; q = 2."""
    model = tiny_model("llama")
    start = copy.deepcopy(model)
    mask_fn = lambda w: w.abs() < 0.02  # noqa: E731
    x = tiny_inputs(model)
    opt = ZoSGD(_params(model), lr=1e-2, seed=3, mask_fn=mask_fn)
    for _ in range(3):
        for j in range(2):
            g, _ = zo_projected_grad(model, _params(model), opt.step_seed(j), 1e-3,
                                     lambda: model(**x, labels=x["input_ids"]).loss, mask_fn)
            opt.record(opt.step_seed(j), g.item() / 2)
        opt.step()
    again = ZoSGD(_params(start), lr=1e-2, seed=3, mask_fn=mask_fn)
    again.replay(opt.state_dict()["zo"]["history"])
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(start)))


def test_nan_guard(tmp_path):
    trainer = _zo_trainer(tmp_path, max_steps=2)
    trainer.zo.objective = lambda model, inputs: model(**inputs).loss * float("nan")
    from qft.errors import QftError

    with pytest.raises(QftError, match="projected gradient became nan"):
        trainer.train()


def test_non_differentiable_objective_drives_the_estimate(tmp_path):
    """MeZO section 3: any scalar objective works, e.g. minus accuracy; g is its central difference."""
    calls = []

    def minus_accuracy(model, inputs):
        logits = model(input_ids=inputs["input_ids"]).logits[:, :-1]
        acc = (logits.argmax(-1) == inputs["input_ids"][:, 1:]).float().mean()
        calls.append(acc.item())
        return -acc

    trainer = _zo_trainer(tmp_path, max_steps=3, lr=1e-3)
    trainer.zo.objective = minus_accuracy
    trainer.train()
    assert len(calls) == 6  # two forwards per step
    logged = trainer.optimizer.optimizer
    # each step's projected gradient is (f(+) - f(-)) / 2eps of the objective values the trainer saw
    expected = [(-calls[2 * k] + calls[2 * k + 1]) / 2e-3 for k in range(3)]
    assert trainer._zo_last_g == pytest.approx(expected, rel=1e-6)  # no log fired in 3 steps: all kept
    assert logged.zo_state["t"] == 3


def test_perturbation_runs_per_decoder_layer():
    """Parameters inside a ModuleList's child are swapped by that child's forward (one launch per layer on
    a GPU); parameters outside any layer stack by their own module's."""
    from qft.zo.spsa import _runner

    model = torch.nn.Module()
    model.emb = torch.nn.Embedding(10, 4)
    model.layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(4, 4)) for _ in range(2))
    modules = dict(model.named_modules())
    assert _runner("layers.1.0", modules["layers.1.0"], modules) is model.layers[1]
    assert _runner("emb", model.emb, modules) is model.emb


def test_zo_distribution_option_is_checked():
    from qft.errors import QftError
    from qft.train import FinetuneConfig

    assert FinetuneConfig(method="mezo", zo_distribution="rademacher").zo_distribution == "rademacher"
    with pytest.raises(QftError, match="pass one of gaussian, rademacher, rank1"):
        FinetuneConfig(method="mezo", zo_distribution="uniform")
    with pytest.raises(QftError, match="applies to mezo and sparse-mezo"):
        FinetuneConfig(method="qlora", zo_distribution="rademacher")


@pytest.mark.parametrize("method", ["qlora", "mezo"])
def test_weight_decay_option_reaches_the_optimizer(tiny_model_dir, jsonl, tmp_path, method):
    from transformers import TrainerCallback

    from qft.train import FinetuneConfig, finetune

    seen = {}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            seen["args"] = args.weight_decay
            opt = getattr(optimizer, "optimizer", optimizer)
            seen["groups"] = sorted({g["weight_decay"] for g in opt.param_groups})

    finetune(FinetuneConfig(model=str(tiny_model_dir), data=str(jsonl("text")), output=str(tmp_path / "o"),
                            method=method, max_steps=1, batch_size=4, weight_decay=0.05),
             log=lambda m: None, progress=False, callbacks=[Record()])
    assert seen["args"] == 0.05
    # the Trainer's AdamW exempts biases and norms (a group at 0); ZO-SGD decays only 2-D weights itself
    assert 0.05 in seen["groups"]


@pytest.mark.parametrize("extra", [{}, {"zo_adapter": "lora"}], ids=["all-weights", "lora"])
def test_finetune_takes_several_directions_in_one_paired_forward(tiny_model_dir, jsonl, tmp_path, extra):
    """`qft finetune --method mezo --zo-paired --zo-samples 3`: three directions a step, one forward each step."""
    from transformers import TrainerCallback

    from qft.train import FinetuneConfig, finetune

    seen = {"forwards": 0}

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.register_forward_hook(lambda *a: seen.__setitem__("forwards", seen["forwards"] + 1))

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            seen["history"] = getattr(optimizer, "optimizer", optimizer).zo_state["history"]
            seen.setdefault("at_step_end", []).append(seen["forwards"])

    finetune(FinetuneConfig(model=str(tiny_model_dir), data=str(jsonl("text")), output=str(tmp_path / "o"),
                            method="mezo", max_steps=2, batch_size=4, zo_paired=True, zo_distribution="rank1",
                            zo_samples=3, **extra), log=lambda m: None, progress=False, callbacks=[Record()])
    assert [len(e["directions"]) for e in seen["history"]] == [3, 3]
    assert seen["at_step_end"] == [1, 2]  # one forward a step


def test_finetune_paired_on_opt(jsonl, tmp_path):
    """`qft finetune --method mezo --zo-paired` on an OPT model (it used to be refused: its feed-forward layers take
    the tokens flattened): one forward a step, and the weights move."""
    from safetensors.torch import load_file

    from qft.train import FinetuneConfig, finetune
    from tests.tiny import save_tiny

    model_dir = save_tiny("opt", tmp_path / "opt")
    finetune(FinetuneConfig(model=str(model_dir), data=str(jsonl("text")), output=str(tmp_path / "o"), method="mezo",
                            max_steps=2, batch_size=4, learning_rate=1e-3, zo_paired=True, zo_distribution="rank1",
                            zo_samples=2), log=lambda m: None, progress=False)
    before = tiny_model("opt").state_dict()
    after = load_file(tmp_path / "o" / "model.safetensors")
    assert any(not torch.equal(before[k], v) for k, v in after.items() if k in before)


@pytest.mark.parametrize("method,extra", [("mezo", {}), ("sparse-mezo", {}), ("mezo", {"zo_adapter": "lora"})])
def test_resume_from_a_checkpoint_without_weights(tiny_model_dir, jsonl, tmp_path, method, extra):
    """`--resume auto` on a ZO checkpoint kept without its weights (optimizer state, scheduler, RNG, trainer state:
    what benchmarks/sst2_gpu_runs.sh keeps when the machine goes) rebuilds them by replay and finishes the same run,
    bit-exactly; a weightless checkpoint of a first-order method is refused in one line."""
    import shutil

    from safetensors.torch import load_file

    from qft.errors import QftError
    from qft.train import FinetuneConfig, finetune

    data = jsonl("text")
    cfg = dict(model=str(tiny_model_dir), data=str(data), method=method, max_steps=6, save_steps=3, batch_size=4,
               learning_rate=1e-3, weight_decay=0.01, **extra)
    full = tmp_path / "full"
    finetune(FinetuneConfig(output=str(full), **cfg), log=lambda m: None, progress=False)
    part = tmp_path / "part"
    light = part / "checkpoints" / "checkpoint-3"
    light.mkdir(parents=True)
    for f in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        shutil.copy(full / "checkpoints" / "checkpoint-3" / f, light / f)
    logs = []
    finetune(FinetuneConfig(output=str(part), resume="auto", **cfg), log=logs.append, progress=False)
    assert any("rebuilding the weights of checkpoint-3 from its 3 zeroth-order steps" in m for m in logs)
    weights = "model.safetensors" if method == "mezo" and not extra else "adapter_model.safetensors"
    a, b = load_file(full / weights), load_file(part / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rebuilt = load_file(light / weights)  # the checkpoint is whole again
    assert all(torch.equal(v, load_file(full / "checkpoints" / "checkpoint-3" / weights)[k]) for k, v in rebuilt.items())

    shutil.rmtree(part)
    light.mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "checkpoint-3" / "trainer_state.json", light)
    with pytest.raises(QftError, match="no model weights, and no zeroth-order history"):
        finetune(FinetuneConfig(output=str(part), resume="auto", **{**cfg, "method": "qlora", "zo_adapter": None}),
                 log=lambda m: None, progress=False)


@pytest.mark.parametrize("dist", ["gaussian", "rank1"])
def test_paired_forward_is_both_perturbed_forwards_in_one(dist):
    """rank1 matrices by a sign per row, norms by running their module once per half; the stored weights are
    untouched and the modules' own forwards come back."""
    check_paired_forward_several(dist, seeds=9)


def test_paired_projected_grad_matches_two_forwards_also_under_sparse_mezo():
    from peft import get_peft_model

    from qft import SparseMezoConfig
    from qft.zo.trainer import lm_loss_halves, zo_projected_grad_paired

    for make in (lambda: tiny_model("llama"),
                 lambda: get_peft_model(tiny_model("llama"), SparseMezoConfig(density=0.3, target_modules="all-linear"))):
        model = make()
        params = _params(model)
        x = tiny_inputs(model)
        x["labels"] = x["input_ids"].clone()
        dist = "rank1" if not hasattr(model, "peft_config") else "gaussian"
        g1, l1 = zo_projected_grad(model, params, 4, 1e-2, lambda: model(**x).loss, dist=dist)
        g2, l2 = zo_projected_grad_paired(model, params, 4, 1e-2, x, lm_loss_halves, dist=dist)
        assert abs(g1.item()) > 1e-3
        # the losses agree to float32 rounding (one ulp of a loss near 5 is 5e-7; g divides by 2 eps)
        torch.testing.assert_close(g2, g1, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(l2, l1, rtol=1e-6, atol=1e-6)


def check_paired_forward_several(dist: str, make=lambda: tiny_model("llama"), seeds=(3, 11, 40), device="cpu",
                                 atol=2e-6):
    """q seeds: one forward of the batch 2q times, block 2k seeing θ + eps·z_k and block 2k+1 θ − eps·z_k, as 2q
    perturbed forwards would; every tuned tensor takes part, and the weights and the modules' forwards come back
    untouched (shared with the Triton-interpreter test and the GPU test). ``seeds`` may be one int: perturbed_pair's
    single-direction call, the batch twice."""
    from qft.zo.spsa import perturbed_pair

    model = make().to(device)
    params = _params(model)
    before = [p.detach().clone() for p in params]
    x = {k: v.to(device) for k, v in tiny_inputs(model).items()}
    b = x["input_ids"].shape[0]
    each = [seeds] if isinstance(seeds, int) else list(seeds)
    with torch.no_grad():
        refs = []
        for seed in each:
            for sign in (1.0, -1.0):
                with perturbed(model, params, seed, sign * 1e-2, dist=dist):
                    refs.append(model(**x).logits)
        with perturbed_pair(model, params, seeds if isinstance(seeds, int) else each, 1e-2, b, dist=dist,
                            seq=x["input_ids"].shape[1]) as seen:
            together = model(**{k: torch.cat([v] * (2 * len(each))) for k, v in x.items()}).logits
    assert len(seen) == len(params)
    for j, ref in enumerate(refs):
        torch.testing.assert_close(together[j * b:(j + 1) * b], ref, atol=atol, rtol=1e-5)
    assert all(torch.equal(p, q) for p, q in zip(_params(model), before))
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("dist", ["gaussian", "rank1"])
@pytest.mark.parametrize("make", [lambda: tiny_model("llama"), _tied_llama, lambda: tiny_model("qwen2"),
                                  lambda: tiny_model("opt"), _gpt2],
                         ids=["llama", "llama-tied", "qwen2", "opt", "gpt2"])
def test_paired_forward_takes_several_directions_at_once(dist, make):
    """rank1 matrices of linear and embedding modules through one term of all the directions; norms and biases by
    their module once per block. OPT's feed-forward layers take the rows' tokens flattened into one 2-D tensor, and
    its position embedding (an Embedding subclass, so a copy per block) the mask with position ids as keywords;
    GPT-2's position embedding takes one row of position ids for every row (expanded, each block its own term)."""
    check_paired_forward_several(dist, make)


@pytest.mark.parametrize("dist", ["gaussian", "rank1"])
@pytest.mark.parametrize("pick", ["gathered", "one-float-row", "flat-without-seq"])
def test_paired_forward_refuses_rows_it_cannot_tell_apart(pick, dist):
    """A tuned module fed some of the tokens (a mixture-of-experts layer's gathered ones), one float row, or
    flattened tokens when the caller did not say how many a row holds: one line, not silently wrong signs."""
    from torch import nn

    from qft.errors import QftError
    from qft.zo.spsa import perturbed_pair

    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            flat = x.reshape(-1, 4)
            return self.lin({"gathered": flat[::3], "one-float-row": flat[:1], "flat-without-seq": flat}[pick])

    model = Picky()
    seq = None if pick == "flat-without-seq" else 6
    with pytest.raises(QftError, match="take the batch first"), torch.no_grad():
        with perturbed_pair(model, list(model.parameters()), 5, 1e-2, 2, dist=dist, seq=seq):
            model(torch.randn(4, 6, 4))


@pytest.mark.parametrize("make", [lambda: tiny_model("opt"), _gpt2], ids=["opt", "gpt2"])
@pytest.mark.parametrize("samples", [1, 3])
def test_paired_projected_grads_on_opt_and_gpt2_match_two_forwards_also_over_lora(make, samples):
    """zo_projected_grad_paired over all weights and over a LoRA adapter (whose lora_A takes OPT's flattened tokens)
    gives the projected gradients and loss of separate perturbed forwards."""
    from peft import LoraConfig, get_peft_model

    from qft.zo.trainer import lm_loss_halves, zo_projected_grad_paired

    seeds = [4, 17, 30][:samples]
    lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    for model in (make(), get_peft_model(make(), lora)):
        params = _params(model)
        x = tiny_inputs(model)
        x["labels"] = x["input_ids"].clone()
        ref = [zo_projected_grad(model, params, seed, 1e-2, lambda: model(**x).loss, dist="rank1") for seed in seeds]
        gs, loss = zo_projected_grad_paired(model, params, seeds, 1e-2, x, lm_loss_halves, dist="rank1")
        assert min(abs(g.item()) for g, _ in ref) > 1e-4
        torch.testing.assert_close(torch.as_tensor(gs).flatten(), torch.stack([g for g, _ in ref]).flatten(),
                                   rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(torch.as_tensor(loss), sum(l for _, l in ref) / len(ref), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
def test_one_term_of_several_directions_is_each_blocks_own(kind):
    """perturb_output_multi: block 2k of the rows gets +scale·(its direction k's term), block 2k+1 minus it, as
    perturb_output gives for direction k alone (GPT-2's Conv1D included)."""
    from qft.zo import lowrank

    q, batch, m, n = 3, 2, 5, 7
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(q, m, generator=g), torch.randn(q, n, generator=g)
    if kind == "embedding":
        x, width = torch.randint(0, m, (2 * q * batch, 4), generator=g), n
    else:
        x, width = torch.randn(2 * q * batch, 4, n if kind == "linear" else m, generator=g), m if kind == "linear" else n
    out = torch.randn(2 * q * batch, 4, width, generator=g)
    sel = torch.zeros(2 * q, q)
    sel[2 * torch.arange(q), torch.arange(q)], sel[2 * torch.arange(q) + 1, torch.arange(q)] = 1.0, -1.0
    with torch.no_grad():
        got = lowrank.perturb_output_multi(kind, x, out.clone(), u, v, 0.1, sel)
        for blk in range(2 * q):
            rows, k = slice(blk * batch, (blk + 1) * batch), blk // 2
            want = lowrank.perturb_output(kind, x[rows], out[rows].clone(), u[k], v[k], 0.1 if blk % 2 == 0 else -0.1)
            torch.testing.assert_close(got[rows], want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
@pytest.mark.parametrize("grad", [False, True])
def test_paired_term_is_plus_on_the_first_half_and_minus_on_the_second(kind, grad):
    """perturb_output(paired=True): the sign goes into the rank-one add (no launch of its own); each half gets what
    perturb_output gives it with +scale and -scale, bit for bit, in place (no_grad) or as a new tensor (autograd)."""
    from qft.zo import lowrank

    batch, m, n = 3, 5, 7
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(m, generator=g), torch.randn(n, generator=g)
    if kind == "embedding":
        x, width = torch.randint(0, m, (2 * batch, 4), generator=g), n
    else:
        x, width = torch.randn(2 * batch, 4, n if kind == "linear" else m, generator=g), m if kind == "linear" else n
    out = torch.randn(2 * batch, 4, width, generator=g)
    with torch.set_grad_enabled(grad):
        got = lowrank.perturb_output(kind, x, out.clone(), u, v, 0.1, paired=True)
        plus = lowrank.perturb_output(kind, x[:batch], out[:batch].clone(), u, v, 0.1)
        minus = lowrank.perturb_output(kind, x[batch:], out[batch:].clone(), u, v, -0.1)
    assert torch.equal(got, torch.cat([plus, minus]))
    flat, a, b = torch.randn(6, 7, generator=g), torch.randn(6, generator=g), torch.randn(7, generator=g)
    ours, want = flat.clone(), flat.clone()
    lowrank.addr_(ours, a, b, -0.3, beta=0.9, flip=2)  # torch's path off the kernel: the same products
    want.addr_(torch.cat([a[:2], -a[2:]]), b, beta=0.9, alpha=-0.3)
    assert torch.equal(ours, want)


def test_update_plan_is_kept_while_the_tensors_keep_their_storage_and_holds_none_of_them():
    """apply_update_'s split of the tensors is made once and reused while each tensor keeps its storage; a tensor given
    new storage (a device move, .data replaced) gets a new plan; and no cached plan keeps a model's weights alive."""
    import gc
    import weakref

    from qft.zo import spsa

    model = tiny_model("llama")
    params = _params(model)
    spsa._PLANS.clear()
    apply_update_(params, [(4, 0.5)], lr=0.1, dist="rank1")
    (plan,) = [hit[1] for hit in spsa._PLANS.values()]
    apply_update_(params, [(5, 0.5)], lr=0.1, dist="rank1")
    assert [hit[1] for hit in spsa._PLANS.values()] == [plan]
    params[0].data = params[0].data.clone()
    apply_update_(params, [(6, 0.5)], lr=0.1, dist="rank1")
    assert [hit[1] for hit in spsa._PLANS.values()] != [plan] and len(spsa._PLANS) == 1
    ref = weakref.ref(params[1])
    del model, params
    gc.collect()
    assert ref() is None


def test_rank1_hooks_stay_registered_inert_between_zo_forwards_until_released():
    """The rank1 matrices' forward hooks are registered once per layout (not each step), do nothing outside a ZO
    forward, refuse a ZO forward nested in another, and release() removes them and the layout."""
    from qft.zo.spsa import release

    model = tiny_model("llama")
    x = tiny_inputs(model)
    params = _params(model)

    def hooks():
        return {id(h) for mod in model.modules() for h in mod._forward_hooks.values()}

    with torch.no_grad():
        plain = model(**x).logits
        assert not hooks()
        with perturbed(model, params, step_seed=3, scale=1e-2, dist="rank1"):
            first = model(**x).logits
        registered = hooks()
        assert registered and torch.equal(model(**x).logits, plain)  # inert outside
        with perturbed_pair(model, params, 4, 1e-2, batch=x["input_ids"].shape[0], dist="rank1"):
            model(**{k: torch.cat([v, v]) for k, v in x.items()})
        with perturbed(model, params, step_seed=3, scale=1e-2, dist="rank1"):
            assert torch.equal(model(**x).logits, first)
            with pytest.raises(QftError, match="inside another"):
                with perturbed(model, params, step_seed=5, scale=1e-2, dist="rank1"):
                    pass
        assert hooks() == registered
        release(model)
        assert not hooks() and "_qft_zo_layout" not in model.__dict__
        assert torch.equal(model(**x).logits, plain)


@pytest.mark.parametrize("objective", ["lm", "label-words"])
def test_paired_projected_grads_of_several_directions_match_one_at_a_time(objective):
    from qft.zo.objectives import label_word_objective
    from qft.zo.trainer import lm_loss_halves, zo_projected_grad_paired

    model = tiny_model("llama")
    params = _params(model)
    x = tiny_inputs(model, batch=3)
    x["labels"] = torch.full_like(x["input_ids"], -100)
    x["labels"][:, -1] = torch.tensor([5, 6, 5])
    obj = label_word_objective([5, 6]) if objective == "label-words" else None
    halves = obj.halves if obj else lm_loss_halves
    loss_fn = (lambda: obj(model, x)) if obj else (lambda: model(**x).loss)
    seeds = [2, 9, 13, 21]
    gs, loss = zo_projected_grad_paired(model, params, seeds, 1e-2, x, halves, dist="rank1")
    one = [zo_projected_grad(model, params, s, 1e-2, loss_fn, dist="rank1") for s in seeds]
    assert gs.shape == (4,) and all(abs(g) > 1e-3 for g in gs)
    torch.testing.assert_close(gs, torch.stack([g for g, _ in one]), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(loss, torch.stack([l for _, l in one]).mean(), rtol=1e-6, atol=1e-6)


def test_paired_objective_must_give_one_loss_per_block():
    """An objective whose .halves gives two losses whatever the rows (written for one direction) is refused with
    several directions, in one line, instead of pairing the wrong blocks."""
    from qft.errors import QftError
    from qft.zo.trainer import zo_projected_grad_paired

    model = tiny_model("llama")
    x = tiny_inputs(model)
    b = x["input_ids"].shape[0]

    def two_halves(model, inputs, batch):
        logits = model(input_ids=inputs["input_ids"]).logits
        return torch.stack([logits[:batch].mean(), logits[batch:].mean()])

    g, _ = zo_projected_grad_paired(model, _params(model), 1, 1e-2, x, two_halves, dist="rank1")
    assert g.dim() == 0 and b == 2
    with pytest.raises(QftError, match="gave 2 losses for 6 blocks of rows"):
        zo_projected_grad_paired(model, _params(model), [1, 2, 3], 1e-2, x, two_halves, dist="rank1")


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_paired_training_with_several_directions_a_step(tmp_path, family):
    """--zo-paired with --zo-samples 3: each step's three directions from one forward, recorded as unpaired ones
    would be (the same seeds, projected gradients to float rounding); the run's history replays to its weights
    bit for bit, and the loss falls."""
    runs = {}
    for paired in (False, True):
        trainer = _zo_trainer(tmp_path / str(paired), max_steps=4, dist="rank1", family=family)
        trainer.zo.paired, trainer.zo.samples = paired, 3
        trainer.train()
        runs[paired] = trainer
    hist = {k: t.optimizer.optimizer.zo_state["history"] for k, t in runs.items()}
    assert [len(e["directions"]) for e in hist[True]] == [3] * 4
    for a, b in zip(hist[False], hist[True]):
        assert [d[0] for d in a["directions"]] == [d[0] for d in b["directions"]]
        # g = ΔL / 2eps: one float32 ulp of a loss near 4.8 (4.8e-7) moves g by 2.4e-4 at eps 1e-3
        torch.testing.assert_close([d[1] for d in b["directions"]], [d[1] for d in a["directions"]],
                                   rtol=1e-3, atol=5e-4)
    fresh = tiny_model(family)
    ZoSGD(_params(fresh), lr=3e-4, dist="rank1").replay(hist[True])
    assert all(torch.equal(p, q) for p, q in zip(_params(fresh), _params(runs[True].model)))
    trainer = _zo_trainer(tmp_path / "long", max_steps=100, dist="rank1", family=family)
    trainer.zo.paired, trainer.zo.samples = True, 4
    before = _loss(trainer.model)
    trainer.train()
    assert _loss(trainer.model) < before - 0.5


def test_paired_lm_loss_upcasts_the_logits_piece_by_piece(monkeypatch):
    """Each half's mean loss over its labelled tokens, as transformers computes it for that half alone, whether the
    float32 logits go in one piece or a row at a time (at the 8B shape the whole batch's would pass the inference
    peak)."""
    from qft.zo import trainer as zo_trainer

    model = tiny_model("llama")
    x = tiny_inputs(model, batch=4)
    x["labels"] = x["input_ids"].clone()
    x["labels"][0, :3] = -100  # a prompt masked out
    x["labels"][-1, 1:] = -100  # a row with no labelled token after the shift
    batch = x["input_ids"].shape[0] // 2
    with torch.no_grad():
        whole = zo_trainer.lm_loss_halves(model, x, batch)
        monkeypatch.setattr(zo_trainer, "CE_CHUNK_BYTES", 1)
        by_row = zo_trainer.lm_loss_halves(model, x, batch)
        for h, half in enumerate((slice(0, batch), slice(batch, None))):
            alone = model(input_ids=x["input_ids"][half], labels=x["labels"][half]).loss
            torch.testing.assert_close(whole[h], alone, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(by_row, whole, rtol=1e-6, atol=1e-6)


def test_paired_training_in_the_trainer(tmp_path):
    trainer = _zo_trainer(tmp_path, max_steps=150, dist="rank1")
    trainer.zo.paired = True
    before = _loss(trainer.model)
    trainer.train()
    assert _loss(trainer.model) < before - 0.3


def test_paired_needs_an_objective_with_halves():
    from qft.errors import QftError

    with pytest.raises(QftError, match="--zo-paired needs each half"):
        ZoArguments(paired=True, objective=lambda model, inputs: torch.tensor(0.0))


def _decoder_matrices(model):
    """The weight matrices of a tiny model's decoder layers (what all-linear Sparse-MeZO tunes); the rest frozen."""
    mats = [p for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2]
    for p in model.parameters():
        p.requires_grad_(any(p is m for m in mats))
    return mats


@pytest.mark.parametrize("paired", [False, True])
def test_sparse_mezo_in_place_moves_only_the_small_weights_and_learns(paired):
    """MagnitudeMask: MeZO over the weights themselves where |θ_t| <= the tensor's threshold (the paper's Sparse-MeZO,
    no delta tensor). Large weights never move, every entry that moved started under its threshold, the loss falls,
    and a replay of the history from the start rebuilds the weights bit-exactly (the mask re-evaluated as it goes)."""
    from qft.zo.mask import MagnitudeMask, magnitude_threshold
    from qft.zo.trainer import lm_loss_halves, zo_projected_grad_paired

    model = tiny_model("llama")
    mats = _decoder_matrices(model)
    start = copy.deepcopy(model)
    mask = MagnitudeMask(mats, density=0.3)
    assert all(mask.threshold(p) == float(magnitude_threshold(p, 0.3)) for p in mats)
    before = [p.detach().clone() for p in mats]
    x = tiny_inputs(model)
    x["labels"] = x["input_ids"].clone()
    opt = ZoSGD(mats, lr=0.05, seed=1, mask_fn=mask)
    with torch.no_grad():
        first = model(**x).loss.item()
    for _ in range(60):
        seed = opt.step_seed()
        if paired:
            g, _ = zo_projected_grad_paired(model, mats, seed, 1e-3, x, lm_loss_halves, mask)
        else:
            g, _ = zo_projected_grad(model, mats, seed, 1e-3, lambda: model(**x).loss, mask)
        opt.record(seed, g.item())
        opt.step()
    with torch.no_grad():
        assert model(**x).loss.item() < first - 0.05
    moved_any = False
    for p, b in zip(mats, before):
        moved = p.detach() != b
        small = b.abs() <= mask.threshold(p)
        assert not (moved & ~small).any()  # no entry over its threshold at the start ever moved
        moved_any |= bool(moved.any())
    assert moved_any
    again = ZoSGD(_decoder_matrices(start), lr=0.05, seed=1, mask_fn=MagnitudeMask(_decoder_matrices(start), 0.3))
    again.replay(opt.state_dict()["zo"]["history"])
    assert all(torch.equal(a, b) for a, b in zip(mats, _decoder_matrices(start)))


def test_paired_matches_two_forwards_under_a_magnitude_mask():
    from qft.zo.mask import MagnitudeMask
    from qft.zo.trainer import lm_loss_halves, zo_projected_grad_paired

    model = tiny_model("llama")
    mats = _decoder_matrices(model)
    mask = MagnitudeMask(mats, density=0.2)
    x = tiny_inputs(model)
    x["labels"] = x["input_ids"].clone()
    g1, l1 = zo_projected_grad(model, mats, 4, 1e-2, lambda: model(**x).loss, mask)
    g2, l2 = zo_projected_grad_paired(model, mats, 4, 1e-2, x, lm_loss_halves, mask)
    assert abs(g1.item()) > 1e-4
    torch.testing.assert_close(g2, g1, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(l2, l1, rtol=1e-6, atol=1e-6)


def test_a_magnitude_mask_refuses_weight_decay_and_several_directions():
    from qft.errors import QftError
    from qft.zo.mask import MagnitudeMask

    model = tiny_model("llama")
    mats = _decoder_matrices(model)
    mask = MagnitudeMask(mats, density=0.2)
    with pytest.raises(QftError, match="weight decay would move"):
        ZoSGD(mats, lr=1e-3, weight_decay=0.1, mask_fn=mask)
    with pytest.raises(QftError, match="one direction a step"):
        ZoArguments(samples=2, mask_fn=mask)
    with pytest.raises(ValueError, match="not built for this tensor"):
        mask.threshold(torch.zeros(2, 2))


def test_sparse_mezo_in_place_in_the_trainer(tmp_path):
    """The README's recipe: the decoder matrices trainable, the rest frozen, MagnitudeMask as the trainer's mask_fn."""
    from qft.zo.mask import MagnitudeMask

    trainer = _zo_trainer(tmp_path, max_steps=150, lr=1e-2)
    mats = _decoder_matrices(trainer.model)
    trainer.zo.mask_fn = mask = MagnitudeMask(mats, density=0.3)
    before = [p.detach().clone() for p in mats]
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    loss = _loss(trainer.model)
    trainer.train()
    assert trainer.optimizer.optimizer.mask_fn is mask
    assert _loss(trainer.model) < loss - 0.05
    for p, b in zip(mats, before):
        assert not ((p.detach() != b) & (b.abs() > mask.threshold(p))).any()
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.model.named_parameters() if n in frozen)
