"""One request pipeline for both APIs: an image over the prompt limit is refused by the same check on
``/infer`` and on the chat API, each naming the request field that holds the image; and
``limits.max_prompt_tokens`` is compared in one place per layer (the gateway: the images' tokens; the
replica's engine: the whole prompt as tokenized)."""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from deployments.gateway import pipeline
from tests.deployments.openai_api.test_openai_unit import Service, _cfg, _data_url, _png, _user
from tests.test_layout import ROOT, _sources


@pytest.fixture
def make(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Service]:
    """Makes a gateway on fake deployments (test_openai_unit's), found by Serve's view."""
    from ray import serve

    def service(*args: Any, **kw: Any) -> Service:
        s = Service(*args, **kw)
        monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=s.gateway))
        return s

    return service


def test_both_apis_refuse_an_over_limit_image_through_the_same_check(
    make: Callable[..., Service], monkeypatch: pytest.MonkeyPatch
) -> None:
    tight = make(_cfg(limits={"max_prompt_tokens": 50}))  # one 64x48 image is 70 tokens
    checked: list[str] = []
    check = pipeline.check_image_tokens

    def spy(images: Any, limits: Any, field: str) -> int:
        checked.append(field)
        return check(images, limits, field)

    monkeypatch.setattr(pipeline, "check_image_tokens", spy)
    infer = tight.http.post(
        "/infer", json={"image_b64": _data_url(), "prompt": "Click", "expert": "calendar"}
    )
    chat = tight.chat(messages=[_user("Click")])
    assert checked == ["image_b64", "messages"]  # one check, each API naming its image field
    assert infer.status_code == chat.status_code == 413
    ierr, cerr = infer.json()["error"], chat.json()["error"]
    assert ierr["field"] == "image_b64" and (cerr["param"], cerr["code"]) == (
        "messages",
        "context_length_exceeded",
    )
    assert cerr["message"] == f"messages: {ierr['message']}"  # the same refusal, in each API's shape
    assert "image is 70 tokens at 320x224 (from 64x48), over the prompt limit of 50 tokens" in ierr["message"]
    assert not tight.merged.queries and not tight.dynamic.queries  # refused before any replica


def test_the_pipeline_makes_the_same_query_of_either_api(make: Callable[..., Service]) -> None:
    """/infer and the chat API's /infer-shaped message reach the replica as the same query."""
    s = make()
    body = {"image_b64": _data_url(_png((96, 64))), "prompt": "Click", "expert": "calendar"}
    assert s.http.post("/infer", json=body).status_code == 200
    assert s.chat(messages=[_user("Click", _data_url(_png((96, 64))))]).status_code == 200
    (a, _), (b, _) = s.merged.queries
    assert (a.image, a.prompt, a.bounds, a.image_tokens, a.turns, a.images) == (
        b.image,
        b.prompt,
        b.bounds,
        b.image_tokens,
        b.turns,
        b.images,
    )


# ----------------------------------------------------------------------------- one comparison per layer
#: Where ``max_prompt_tokens`` is compared, and why there: the gateway knows the images' tokens before any
#: replica (a request whose images alone are over the limit never leaves it); the whole prompt's tokens are
#: known where it is tokenized, the replica's engine, which checks it as it queues the request.
LIMIT_CHECKS = {
    ("deployments/gateway/pipeline.py", "check_image_tokens"),
    ("moe_core/engine/scheduler.py", "Scheduler.check"),
}
#: The other request limits, each compared in exactly one place, at the gateway, as the request is read.
ONE_CHECK = {
    "max_completion_tokens": {("deployments/openai_api/request.py", "sampling_of")},
    "max_prompt_chars": {("deployments/gateway/pipeline.py", "check_prompt_chars")},
}


def _mentions(node: ast.AST, names: set[str], limit: str = "max_prompt_tokens") -> bool:
    return any(
        (isinstance(n, ast.Attribute) and n.attr == limit) or (isinstance(n, ast.Name) and n.id in names)
        for n in ast.walk(node)
    )


def _comparisons(tree: ast.Module, limit: str = "max_prompt_tokens") -> Iterator[str]:
    """The functions (by qualified name) that compare with ``limit`` (an attribute, e.g. of the limits
    section), directly or through a local name assigned from it; a function's parameter named ``limit``
    counts too (``sampling_of(req, max_completion_tokens)``)."""

    def visit(node: ast.AST, scope: str) -> Iterator[str]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{scope}.{child.name}" if scope else child.name
                if not isinstance(child, ast.ClassDef):
                    aliases = {
                        t.id
                        for a in ast.walk(child)
                        if isinstance(a, ast.Assign) and _mentions(a.value, set(), limit)
                        for t in a.targets
                        if isinstance(t, ast.Name)
                    } | {a.arg for a in child.args.args if a.arg == limit}
                    body = [
                        n for n in child.body if not isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
                    ]
                    if any(
                        isinstance(c, ast.Compare) and _mentions(c, aliases, limit)
                        for b in body
                        for c in ast.walk(b)
                    ):
                        yield name
                yield from visit(child, name)

    yield from visit(tree, "")


def test_max_prompt_tokens_is_compared_once_per_layer() -> None:
    found = {
        (path.relative_to(ROOT).as_posix(), where)
        for path in _sources()
        for where in _comparisons(ast.parse(path.read_text()))
    }
    assert found == LIMIT_CHECKS, (
        "limits.max_prompt_tokens is checked in one place per layer (LIMIT_CHECKS says why there); "
        f"found {sorted(found - LIMIT_CHECKS)} beside them, or {sorted(LIMIT_CHECKS - found)} gone"
    )


@pytest.mark.parametrize("limit", sorted(ONE_CHECK))
def test_each_other_limit_is_compared_in_one_place(limit: str) -> None:
    found = {
        (path.relative_to(ROOT).as_posix(), where)
        for path in _sources()
        for where in _comparisons(ast.parse(path.read_text()), limit)
    }
    assert found == ONE_CHECK[limit], f"limits.{limit} is checked in one place; found {sorted(found)}"


def test_the_comparison_finder_sees_a_second_check(tmp_path: Path) -> None:
    code = (
        "class Engine:\n"
        "    def check(self, n):\n"
        "        most = self.settings.max_prompt_tokens\n"
        "        return n > most\n"
        "def elsewhere(limits, n):\n"
        "    if n >= limits.max_prompt_tokens:\n"
        "        raise ValueError\n"
    )
    assert set(_comparisons(ast.parse(code))) == {"Engine.check", "elsewhere"}
