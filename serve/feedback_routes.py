"""Feedback through the API: thumbs and corrections, comparisons of 2 to 4 answers and their votes
(a choice or a ranking), stats and live win rates.

Every write is one store transaction. Posts are rate limited per user (`feedback_rate_limit`
posts a minute, all kinds together), and a user may only give feedback on their own
completions and vote on their own comparisons."""

from __future__ import annotations

import asyncio
import random
from typing import Annotated, Callable, Literal, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from feedback import rankings
from feedback.errors import FeedbackError, Invalid, NotFound, NotYours
from feedback.stats import feedback_stats
from feedback.winrates import head_to_head, live_win_rates
from serve.auth import User, current_user, require_admin
from serve.chat import cancel_on_disconnect, generate
from serve.errors import APIError
from serve.protocol import ChatCompletionRequest
from serve.registry import ALIAS

router = APIRouter()
T = TypeVar("T")

_STATUS = {NotFound: (404, "not_found"), NotYours: (403, "not_owner"), Invalid: (400, "invalid_value")}


def _rating(value: int) -> int:
    if value not in (1, -1):
        raise ValueError("rating must be 1 or -1")
    return value


def _not_blank(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("must not be empty")
    return value


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    completion_id: str = Field(min_length=1, max_length=256)
    rating: Annotated[StrictInt, AfterValidator(_rating)]
    reason: str | None = Field(None, max_length=256)
    comment: str | None = Field(None, max_length=10_000)
    correction: Annotated[str | None, AfterValidator(_not_blank)] = Field(None, max_length=100_000)
    choice_index: int = Field(0, ge=0)


class VoteRequest(BaseModel):
    """`choice`: a label (that answer beats every other), `tie`, or `both_bad`/`all_bad`; or `ranking`:
    groups of labels, best first, ties sharing a group. The store checks them against the comparison."""

    model_config = ConfigDict(extra="forbid", strict=True)
    choice: Literal[tuple(rankings.LABELS) + rankings.WORDS] | None = None
    ranking: list[list[Literal[tuple(rankings.LABELS)]]] | None = Field(None, min_length=1,
                                                                       max_length=rankings.MAX_CANDIDATES)


class ComparisonRequest(ChatCompletionRequest):
    """A chat request answered by `n` anonymous candidates (2 to 4; default: as many as `models`, else 2).
    `models` names each candidate's model; without it `model` answers every one (for the `loopchat`
    alias the registry picks a version per candidate). Each candidate is one choice, so `n` here
    counts candidates, not OpenAI's choices."""

    n: int | None = Field(None, ge=rankings.MIN_CANDIDATES, le=rankings.MAX_CANDIDATES)
    models: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=rankings.MIN_CANDIDATES, max_length=rankings.MAX_CANDIDATES)

    @field_validator("models")
    @classmethod
    def _one_per_candidate(cls, models, info):
        n = info.data.get("n")
        if models is not None and n is not None and len(models) != n:
            raise ValueError(f"give one model per candidate: n is {n}, models has {len(models)}")
        return models

    @model_validator(mode="after")
    def _one_answer_each(self):
        if self.stream:
            raise ValueError("comparisons are not streamed; leave `stream` false")
        if not self.store:
            raise ValueError("a comparison is stored to be voted on; leave `store` true")
        return self

    def candidates(self) -> int:
        return self.n or len(self.models or ()) or rankings.MIN_CANDIDATES


def _store_call(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run a store operation, turning its refusals into OpenAI-shaped API errors."""
    try:
        return fn(*args, **kwargs)
    except FeedbackError as e:
        status, code = _STATUS[type(e)]
        raise APIError(status, e.message, param=e.param, code=code) from e


def rate_limited(request: Request, user: User = Depends(current_user)) -> User:
    wait = request.app.state.feedback_limiter.hit(user.name)
    if wait:
        raise APIError(429, f"Too much feedback: at most {request.app.state.feedback_limiter.limit} posts a "
                       f"minute. Try again in {wait:.0f} s.", code="rate_limit_exceeded")
    return user


def _feedback_view(row: dict) -> dict:
    return {"id": row["id"], "object": "feedback", **row}


def _comparison_view(cmp: dict) -> dict:
    """The comparison as its creator sees it: which model wrote which, and where it came from, only
    once they voted."""
    voted = cmp["choice"] is not None
    return {"id": cmp["id"], "object": "comparison", "created_at": cmp["created_at"], "choice": cmp["choice"],
            "ranking": cmp["ranking"],
            "candidates": [c if voted else {k: c[k] for k in ("label", "id", "content")} for c in cmp["candidates"]]}


@router.post("/v1/feedback")
def post_feedback(body: FeedbackRequest, request: Request, user: User = Depends(rate_limited)):
    state = request.app.state
    row = _store_call(state.store.put_feedback, user.name, body.completion_id, body.rating, reason=body.reason,
                      comment=body.comment, correction=body.correction, choice_index=body.choice_index)
    state.metrics.feedback.labels("thumbs_up" if body.rating > 0 else "thumbs_down").inc()
    if body.correction is not None:
        state.metrics.feedback.labels("correction").inc()
    return _feedback_view(row)


@router.get("/v1/feedback")
def list_feedback(request: Request, completion_id: str | None = None, limit: int = Query(20, ge=1, le=100),
                  user: User = Depends(current_user)):
    rows = request.app.state.store.get_feedback(user.name, completion_id, limit)
    return {"object": "list", "data": [_feedback_view(r) for r in rows]}


@router.post("/v1/comparisons")
async def create_comparison(body: ComparisonRequest, request: Request, user: User = Depends(rate_limited)):
    state = request.app.state
    k = body.candidates()
    if body.models:  # (model, origin): a model the client named is its own origin
        sources = [(m, m) for m in body.models]
    elif body.model == ALIAS:
        sources = state.registry.comparison_models(user.name, k)
    else:
        sources = [(body.model, body.model)] * k
    for model, _ in sources:  # an unknown model fails before anything is generated
        state.registry.resolve(model)
    tasks = [asyncio.ensure_future(generate(state, body.model_copy(update={"model": m, "n": 1}), user,
                                            source="comparison")) for m, _ in sources]
    try:  # a client that hangs up aborts every candidate
        answers = await cancel_on_disconnect(request, asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
    shown = random.sample(list(zip(answers, (origin for _, origin in sources))), k)
    comparison_id = await asyncio.to_thread(state.store.create_comparison, user.name, *(a.id for a, _ in shown),
                                            origins=[origin for _, origin in shown])
    state.metrics.feedback.labels("comparison").inc()
    return {"id": comparison_id, "object": "comparison",
            "candidates": [{"label": label, "id": a.id, "content": a.choices()[0]["content"]}
                           for label, (a, _) in zip(rankings.LABELS, shown)]}


@router.get("/v1/comparisons/{comparison_id}")
def get_comparison(comparison_id: str, request: Request, user: User = Depends(current_user)):
    return _comparison_view(_store_call(request.app.state.store.get_comparison, comparison_id, user.name))


@router.post("/v1/comparisons/{comparison_id}/vote")
def vote(comparison_id: str, body: VoteRequest, request: Request, user: User = Depends(rate_limited)):
    state = request.app.state
    cmp = _store_call(state.store.vote, user.name, comparison_id, body.choice, ranking=body.ranking)
    state.metrics.feedback.labels("vote").inc()
    return {**_comparison_view(cmp), "object": "comparison.vote"}


@router.get("/admin/feedback/stats", dependencies=[Depends(require_admin)])
def stats(request: Request):
    return feedback_stats(request.app.state.store)


@router.get("/admin/winrates", dependencies=[Depends(require_admin)])
def winrates(request: Request, version: str | None = None, opponent: str | None = None,
             since: float | None = None, until: float | None = None):
    """Live head-to-head win rates from users' votes: each published version against its predecessor,
    or, given `version` and `opponent` (served names, e.g. policy-v3), that one pair in [since, until)."""
    store = request.app.state.store
    if version is None and opponent is None:
        if since is not None or until is not None:
            raise APIError(400, "since and until need version and opponent", param="since", code="invalid_value")
        return {"object": "list", "data": live_win_rates(store, request.app.state.registry.base_name)}
    if version is None or opponent is None:
        raise APIError(400, "give both version and opponent, or neither",
                       param="opponent" if opponent is None else "version", code="invalid_value")
    return {"object": "list", "data": [head_to_head(store, version, opponent, since, until)]}
