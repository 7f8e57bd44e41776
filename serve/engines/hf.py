"""The transformers engine: in-process generation with peft named adapters, for machines
without vLLM. Same interface and behaviour as the vLLM engine, one request at a time."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import AsyncIterator

import hardware
from serve.engines.base import EngineError, EngineUnavailable

log = logging.getLogger("loopchat.transformers")


class TransformersEngine:
    kind = "transformers"

    def __init__(self, *, model_dir: Path, served_name: str, max_model_len: int = 2048,
                 dtype: hardware.Choice | None = None):
        self.model_dir, self.served_name, self.max_model_len = Path(model_dir), served_name, max_model_len
        self.choice = dtype or hardware.choose()
        self.info = {"dtype": self.choice.dtype, "device": self.choice.device, "reason": self.choice.reason}
        self.model = self.tokenizer = None
        self._adapters: dict[str, str] = {}
        self._lock = threading.Lock()  # one generate (or adapter change) at a time
        self._loading: asyncio.Task | None = None

    async def start(self) -> None:
        self._loading = asyncio.create_task(asyncio.to_thread(self._load))

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.monotonic()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.choice.torch_dtype)
        self.device = self.choice.device
        self.model = model.to(self.device).eval()
        log.info("transformers engine ready after %.1f s (%s on %s, %s)", time.monotonic() - t0, self.served_name,
                 self.device, self.choice.dtype)

    async def stop(self) -> None:
        if self._loading:
            self._loading.cancel()

    async def ready(self) -> bool:
        return self.model is not None

    # ---- adapters: peft's named adapters on one base model ------------------------------
    async def load_adapter(self, name: str, path: str) -> None:
        if not (Path(path) / "adapter_config.json").is_file():
            raise EngineError(404, f"no adapter at {path}")
        await asyncio.to_thread(self._load_adapter, name, path)

    def _load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        with self._lock:
            if not self._adapters:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
            else:
                self.model.load_adapter(path, adapter_name=name)
            self._adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        if name in self._adapters:
            await asyncio.to_thread(self._unload_adapter, name)

    def _unload_adapter(self, name: str) -> None:
        with self._lock:
            others = [a for a in self._adapters if a != name]
            if others:
                self.model.set_adapter(others[0])
                self.model.delete_adapter(name)
            else:
                self.model = self.model.unload()  # back to the plain base model
            del self._adapters[name]

    async def adapters(self) -> list[str]:
        return list(self._adapters)

    # ---- generation --------------------------------------------------------------------
    async def stream(self, model: str, messages: list[dict], sampling: dict) -> AsyncIterator[dict]:
        if self.model is None:
            raise EngineUnavailable("the transformers engine is still loading")
        if model != self.served_name and model not in self._adapters:
            raise EngineError(404, f"The model `{model}` does not exist.", code="model_not_found", param="model")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                                 return_tensors="pt")["input_ids"]
        prompt_len = ids.shape[1]
        max_new = sampling.get("max_tokens") or self.max_model_len - prompt_len
        if prompt_len + max_new > self.max_model_len:
            raise EngineError(413, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                              f"you requested {prompt_len + max_new} tokens ({prompt_len} in the messages, "
                              f"{max_new} in the completion).", code="context_length_exceeded", param="messages")
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index: int, delta: dict, finish: str | None = None) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}

        completion_tokens = 0
        for index in range(sampling.get("n", 1)):
            yield chunk(index, {"role": "assistant", "content": ""})
            queue: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            thread = threading.Thread(target=self._generate, args=(model, ids, max_new, sampling, loop, queue),
                                      daemon=True)
            thread.start()
            while True:
                kind, value = await queue.get()
                if kind == "text":
                    yield chunk(index, {"content": value})
                elif kind == "error":
                    raise value
                else:
                    finish, n_tokens = value
                    completion_tokens += n_tokens
                    yield chunk(index, {}, finish)
                    break
        yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
               "usage": {"prompt_tokens": prompt_len, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_len + completion_tokens}}

    def _generate(self, model_name, ids, max_new, sampling, loop, queue) -> None:
        """Runs in a thread: generate one choice, pushing text pieces to the asyncio queue."""
        import torch
        from transformers import TextIteratorStreamer

        def put(kind, value):
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        stops = sampling.get("stop") or []
        holdback = max((len(s) for s in stops), default=1) - 1
        temperature = sampling.get("temperature", 1.0)
        kwargs = dict(max_new_tokens=max_new, pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=sampling.get("top_p", 1.0), top_k=0)
        else:
            kwargs.update(do_sample=False)
        if stops:
            kwargs.update(stop_strings=stops, tokenizer=self.tokenizer)
        try:
            with self._lock:
                if sampling.get("seed") is not None:
                    torch.manual_seed(sampling["seed"])
                streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
                result = {}

                def run():
                    with torch.inference_mode():
                        if model_name == self.served_name and self._adapters:
                            with self.model.disable_adapter():
                                result["out"] = self.model.generate(ids.to(self.device), streamer=streamer, **kwargs)
                        else:
                            if self._adapters:
                                self.model.set_adapter(model_name)
                            result["out"] = self.model.generate(ids.to(self.device), streamer=streamer, **kwargs)

                gen = threading.Thread(target=run, daemon=True)
                gen.start()
                text, sent, stopped = "", 0, False
                for piece in streamer:
                    text += piece
                    cut = min((text.find(s) for s in stops if s in text), default=-1)
                    if cut >= 0:
                        text, stopped = text[:cut], True
                    safe = len(text) if stopped else max(sent, len(text) - holdback)
                    if safe > sent:
                        put("text", text[sent:safe])
                        sent = safe
                    if stopped:
                        for _ in streamer:  # drain what generate emits before it sees the stop string
                            pass
                        break
                gen.join()
            if len(text) > sent:
                put("text", text[sent:])
            out = result["out"][0][ids.shape[1]:]
            ended = stopped or (len(out) < max_new) or int(out[-1]) == self.tokenizer.eos_token_id
            put("done", ("stop" if ended else "length", len(out)))
        except Exception as e:  # surfaced to the request, never kills the engine
            put("error", EngineError(500, f"generation failed: {e}"))
