"""optim.cuda_graph: the step's part after backward (true) and the whole step (step) as the graphs run them (static
inputs, schedule on the device, weight decay outside torch's AdamW, gradients kept in place) equal the default
step, on torch's update path and on the Triton one; capturing needs CUDA and says so otherwise."""
import pytest
import torch

from fastdino.engine.cuda_graph import PostBackwardGraphs, StepGraph, resolve_cuda_graph

from _helpers import assert_close
from test_train import make_trainer, synthetic_batches, tiny_config

# The decay p * (1 - lr * wd) is applied by one foreach op instead of inside the fused AdamW kernel: fp32 rounding.
TOL = dict(atol=1e-6, rtol=1e-5)
STEPS = 5  # last layer frozen for the first 2 (0.5 epoch of 4 steps): both graphs' parameter sets


def run(trainer, batches):
    losses = []
    for crops in batches:
        trainer.train_step(crops)
        losses.append(trainer.stats.read()["loss"])
    return torch.tensor(losses)


def graphed_and_default(graphs, precision="fp32", impl="torch", steps=STEPS):
    """(default trainer, its losses, trainer running `graphs` uncaptured, its losses) over the same batches."""
    cfg = tiny_config("optim.freeze_last_layer_epochs=0.5", "optim.weight_decay=0.3", "optim.base_lr=0.05",
                      "optim.warmup_epochs=0", f"parallel.precision={precision}",
                      f"optim.impl={impl}")  # large lr * wd: decay shows
    batches = synthetic_batches(cfg, steps)
    torch.manual_seed(0)
    default = make_trainer(cfg)
    expected = run(default, batches)
    torch.manual_seed(0)
    graphed = make_trainer(cfg)
    graphed.graphs = graphs(graphed, capture=False)  # the captured function, run eagerly
    return default, expected, graphed, run(graphed, batches)


@pytest.mark.parametrize("precision, impl", [("fp32", "torch"), ("fp16", "torch"), ("fp32", "triton")])
def test_graph_ready_update_equals_the_default_step(precision, impl):
    default, expected, graphed, actual = graphed_and_default(PostBackwardGraphs, precision, impl)
    assert_close(actual, expected, **TOL, name="losses")
    for name in ("params", "teacher_params"):
        for i, (a, e) in enumerate(zip(getattr(graphed, name), getattr(default, name), strict=True)):
            assert_close(a, e, **TOL, name=f"{name}[{i}]")
    assert_close(graphed.loss_fn.center, default.loss_fn.center, **TOL, name="center")
    for p_graphed, p_default in zip(graphed.params, default.params):
        exp_avg = graphed.optimizer.state[p_graphed]["exp_avg"]
        assert_close(exp_avg, default.optimizer.state[p_default]["exp_avg"], **TOL, name="exp_avg")
    assert all(p.grad is not None for p in graphed.params), "graphs read gradients where they are: never freed"
    assert all(group["lr"] is graphed.graphs.lr for group in graphed.optimizer.param_groups)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_step_graph_code_path_equals_the_eager_step(impl):
    """optim.cuda_graph=step's function (static crops, schedule on the device, gradients kept and zeroed in place)
    run uncaptured gives the eager step's losses, weights, teacher and center, through both freeze states."""
    default, expected, graphed, actual = graphed_and_default(StepGraph, impl=impl)
    assert_close(actual, expected, **TOL, name="losses")
    for name in ("params", "teacher_params"):
        for i, (a, e) in enumerate(zip(getattr(graphed, name), getattr(default, name), strict=True)):
            assert_close(a, e, **TOL, name=f"{name}[{i}]")
    assert_close(graphed.loss_fn.center, default.loss_fn.center, **TOL, name="center")
    assert graphed.graphs.crops is not None and all(p.grad is not None for p in graphed.params)
    assert not any(p.grad.any() for p in graphed.params), "the update leaves kept gradients at zero"


def test_cuda_graph_modes_resolve():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_cuda_graph("auto", cuda, "single") == "true"
    assert resolve_cuda_graph("auto", cuda, "fsdp") == "false"
    assert resolve_cuda_graph("auto", cpu, "single") == "false"
    assert resolve_cuda_graph("step", cuda, "ddp") == "step"
    with pytest.raises(ValueError, match="optim.cuda_graph=step needs a CUDA device"):
        resolve_cuda_graph("step", cpu, "single")


def test_cuda_graph_needs_cuda():
    with pytest.raises(ValueError, match="optim.cuda_graph=true needs a CUDA device, this run is on cpu; "
                                         "set optim.cuda_graph=false"):
        make_trainer(tiny_config("optim.cuda_graph=true"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_graphs_equal_the_default_step_on_gpu():
    """Warm-up, capture and replays (both freeze states) give the default step's losses and weights."""
    from fastdino.engine.train import Trainer

    overrides = ["optim.freeze_last_layer_epochs=0.5", "optim.weight_decay=0.3", "parallel.precision=fp32"]
    device = torch.device("cuda")
    batches = [[c.to(device) for c in crops] for crops in synthetic_batches(tiny_config(*overrides), 6)]
    results = []
    for cuda_graph in ("false", "true"):
        torch.manual_seed(0)
        trainer = Trainer(tiny_config(*overrides, f"optim.cuda_graph={cuda_graph}"), 4, device=device)
        results.append((run(trainer, batches), trainer))
    (expected, default), (actual, graphed) = results
    assert set(graphed.graphs.graphs) == {True, False} and all(graphed.graphs.graphs.values())
    assert_close(actual, expected, atol=1e-5, rtol=1e-4, name="losses")
    for a, e in zip(graphed.params, default.params, strict=True):
        assert_close(a, e, atol=1e-5, rtol=1e-4, name="student")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_step_graph_equals_the_eager_step_on_gpu():
    """optim.cuda_graph=step: warm-up, capture and replays of the whole step (both freeze states, the Triton update)
    give the eager step's losses and weights; fp32 and no stochastic depth, so that only rounding differs."""
    from fastdino.engine.train import Trainer

    overrides = ["optim.freeze_last_layer_epochs=0.5", "optim.weight_decay=0.3", "parallel.precision=fp32",
                 "model.drop_path_rate=0"]
    device = torch.device("cuda")
    batches = [[c.to(device) for c in crops] for crops in synthetic_batches(tiny_config(*overrides), 8)]
    results = []
    for cuda_graph in ("false", "step"):
        torch.manual_seed(0)
        trainer = Trainer(tiny_config(*overrides, f"optim.cuda_graph={cuda_graph}"), 4, device=device)
        results.append((run(trainer, batches), trainer))
    (expected, default), (actual, graphed) = results
    assert graphed.update_impl == "triton" and any(g is not None for g in graphed.graphs.graphs.values())
    assert_close(actual, expected, atol=1e-5, rtol=1e-4, name="losses")
    for a, e in zip(graphed.params, default.params, strict=True):
        assert_close(a, e, atol=1e-5, rtol=1e-4, name="student")
