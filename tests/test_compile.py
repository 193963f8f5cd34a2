"""A patched model with a fixed schedule compiles as one graph (no per-forward Python state)."""

from __future__ import annotations

import pytest
import torch

import tokenprune
from tests.test_patch import FAMILIES, image, make


@pytest.mark.parametrize("family", FAMILIES)
def test_fullgraph_capture(family: str) -> None:
    # backend="eager" runs Dynamo's capture (where graph breaks would raise) without codegen.
    torch._dynamo.reset()
    model = tokenprune.patch(make(family), r=(8, -1))
    with torch.no_grad():
        expected = model(image())
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(image()), expected, atol=1e-5, rtol=1e-5)


def test_inductor_matches_eager() -> None:
    torch._dynamo.reset()
    model = tokenprune.patch(make("registers", depth=2), r=16)
    with torch.no_grad():
        expected = model(image())
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(image()), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("method", "options"),
    [("tome", dict(r=(8, -1))), ("pitome", dict(r=8)), ("local_global", dict(local_block=0, r=4)), ("evit", dict(keep_ratio=0.7))],
)
def test_torch_export_with_a_dynamic_batch(method: str, options: dict) -> None:
    """torch.export (the graph torch's deployment paths start from) captures a patched model
    whole; exported at batch 2 with a dynamic batch dimension, it gives the eager model's outputs
    exactly at batch 3."""
    model = tokenprune.patch(make("registers", depth=4), method, **options)
    exported = torch.export.export(model, (image(2),), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}})
    with torch.no_grad():
        assert torch.equal(exported.module()(image(3)), model(image(3)))


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("tome", dict(r=(8, -1))),
        ("pitome", dict(r=8)),
        ("local_global", dict(local_block=0, r=4)),
        ("merge_unmerge", dict(ratio=0.5)),
    ],
)
def test_torch_jit_trace(method: str, options: dict) -> None:
    """torch.jit.trace (TorchScript's tracer, which older deployment paths still run) records a
    patched model that gives the eager model's outputs exactly, at the traced batch and another.
    The matchings' bool masks were scattered with the Python scalar True, which the tracer's alias
    analysis cannot type: it stopped with an INTERNAL ASSERT asking to report a PyTorch bug."""
    model = tokenprune.patch(make("registers", depth=4), method, **options)
    with torch.no_grad():
        traced = torch.jit.trace(model, image(2), check_trace=False)
        assert torch.equal(traced(image(2)), model(image(2)))
        assert torch.equal(traced(image(3)), model(image(3)))


def test_torch_export_leaves_no_fake_source_map() -> None:
    """Export traces the forward on fake tensors: a patched model with trace_source=True keeps
    no map from it (tokenprune.source would hand back a FakeTensor of symbolic values), so
    ``source`` still asks for a forward, and after one, reads that forward's real map."""
    model = tokenprune.patch(make("vit_cls", depth=2), r=8, trace_source=True)
    exported = torch.export.export(model, (image(2),), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}})
    with pytest.raises(RuntimeError, match="no forward has run since patching"):
        tokenprune.source(model)
    with torch.no_grad():
        assert torch.equal(exported.module()(image(3)), model(image(3)))
    source = tokenprune.source(model)
    assert type(source) is torch.Tensor and source.shape == (3, 197 - 2 * 8, 197)
    assert torch.equal(source.sum(-1), model.forward_tokens(image(3)).size[..., 0].to(source.dtype))
    torch.export.export(model, (image(2),))  # a later export leaves the eager map as it was
    assert torch.equal(tokenprune.source(model), source)


def test_source_of_a_recorded_graph_names_the_patched_model() -> None:
    """A torch.jit.trace'd or exported module replays a graph and keeps no map. ``source`` on it
    said "patch the model with trace_source=True and run a forward first", which its user had
    done, to the model it came from; it now names that model, whose map is the reference."""
    model = tokenprune.patch(make("vit_cls", depth=2), r=8, trace_source=True)
    with torch.no_grad():
        recorded = [
            torch.jit.trace(model, image(2), check_trace=False),
            torch.export.export(model, (image(2),)).module(),
        ]
        for graph in recorded:
            graph(image(2))
            with pytest.raises(RuntimeError, match="replays a graph recorded from the model.*on the patched model itself"):
                tokenprune.source(graph)
        model(image(2))
    source = tokenprune.source(model)
    assert source.shape == (2, 197 - 2 * 8, 197)
    assert torch.equal(source.sum(-1), model.forward_tokens(image(2)).size[..., 0].to(source.dtype))
