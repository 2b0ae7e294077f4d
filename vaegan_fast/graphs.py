"""The whole training step in one CUDA graph: capture ``Model.train_step`` once, then replay it.

A VAE-GAN step launches a few hundred small kernels; at small and medium batch the GPU waits on the host
that launches them. Replaying a captured graph launches all of them with one call. What makes the step
capturable (see Model.train_step): no host synchronisation and no Python branch on a tensor value inside it
(the equilibrium gate skips updates on the device through fused Adam's ``found_inf``; fp16 loss scaling
updates its scale on the device), noise drawn from the model's own generator (registered with the graph, so
each replay draws new numbers), and optimizers whose state already exists (the first steps run eagerly).

    step = CudaGraphStep(model)          # model on a GPU, Model(check_inputs=False)
    for x in batches:
        stats = step(x)                  # the first `warmup` calls run eagerly, then capture + replay

What a replay does not see: Python-side changes made after capture (a new learning rate, a changed option,
a reloaded optimizer state dict): create a new CudaGraphStep after those. The returned stats are the
graph's static output tensors, overwritten by the next replay: copy them to keep them.
"""
from __future__ import annotations

import warnings

import torch


class CudaGraphStep:
    """``model.train_step`` captured in a CUDA graph and replayed for every batch of the captured shape."""

    def __init__(self, model, warmup: int = 3):
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (optimizer state and kernels must exist before "
                             f"capture), got {warmup!r}")
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {model.device}")
        if model.config["check_inputs"]:
            raise ValueError("CUDA graph capture needs Model(check_inputs=False): the input check reads values "
                             "back to the host, which a graph cannot do")
        host_decisions = [what for what, on in (("gating=True", model.config["gating"]),
                                                ("precision='fp16'", model.config["precision"] == "fp16")) if on]
        if host_decisions and model.config["optimizer"] != "adam":
            raise ValueError(f"CUDA graph capture with {' and '.join(host_decisions)} needs optimizer='adam' (fused "
                             f"Adam skips a gated or overflowing update on the device); "
                             f"{model.config['optimizer']!r} decides on the host")
        if model.data_parallel is not None:
            raise ValueError("CUDA graph capture of a data-parallel step is not supported: its all-reduces "
                             "wait on the host; train data-parallel without CudaGraphStep")
        self.model = model
        self.warmup = warmup
        self.graph = None
        self.static_x = None
        self.static_stats = None
        self._eager_calls = 0
        self._warned_shape = False
        self._side_stream = torch.cuda.Stream(device=model.device)

    def __call__(self, x: torch.Tensor) -> dict:
        model = self.model
        if self.graph is not None:
            if x.shape != self.static_x.shape or x.dtype != self.static_x.dtype or x.device != model.device:
                return self._eager_other_shape(x)
            self.static_x.copy_(x)
            self.graph.replay()
            model.step += 1  # train_step's only Python-side effect
            return self.static_stats
        if self._eager_calls < self.warmup:
            # Warm-up on a side stream (as capture requires): lazy initialisation, optimizer state, kernel
            # compilation and library workspaces all happen here, outside the graph. These are real steps.
            self._eager_calls += 1
            self._side_stream.wait_stream(torch.cuda.current_stream(model.device))
            with torch.cuda.stream(self._side_stream), _capturable(model):
                stats = model.train_step(x)
            torch.cuda.current_stream(model.device).wait_stream(self._side_stream)
            return stats
        return self._capture(x)

    def _capture(self, x: torch.Tensor) -> dict:
        model = self.model
        self.static_x = x.detach().clone()
        graph = torch.cuda.CUDAGraph()
        register = getattr(graph, "register_generator_state", None)
        if register is None:
            raise RuntimeError(f"this torch ({torch.__version__}) cannot register a custom generator with a CUDA "
                               "graph (CUDAGraph.register_generator_state): CUDA graph capture needs torch >= 2.5")
        with torch.cuda.device(model.device):
            register(model._rng())  # each replay advances the noise stream instead of repeating one draw
        torch.cuda.synchronize(model.device)
        with _capturable(model), torch.cuda.graph(graph):
            stats = model.train_step(self.static_x)
        # Capture records the kernels without running them (train_step's step counter did advance once):
        # this first replay is the step for x.
        graph.replay()
        self.graph, self.static_stats = graph, stats
        return stats

    def _eager_other_shape(self, x: torch.Tensor) -> dict:
        if not self._warned_shape:
            self._warned_shape = True
            warnings.warn(f"CudaGraphStep: a batch of shape {tuple(x.shape)} ({x.dtype}) differs from the "
                          f"captured {tuple(self.static_x.shape)} ({self.static_x.dtype}); such batches run "
                          "eagerly", RuntimeWarning, stacklevel=3)
        with _capturable(model := self.model):
            return model.train_step(x)


class _capturable:
    """Optimizers in capturable mode while the step runs (torch refuses to capture an optimizer step
    otherwise), without the warning torch gives for a capturable step that runs uncaptured."""

    def __init__(self, model):
        self.groups = [g for opt in model.optimizers.values() for g in opt.param_groups]

    def __enter__(self):
        self.before = [g.get("capturable", False) for g in self.groups]
        for g in self.groups:
            g["capturable"] = True
        self.quiet = warnings.catch_warnings()
        self.quiet.__enter__()
        warnings.filterwarnings("ignore", message=".*capturable=True.*")
        return self

    def __exit__(self, *exc):
        self.quiet.__exit__(*exc)
        for g, flag in zip(self.groups, self.before):
            g["capturable"] = flag
        return False
