"""A frozen CLIP as a teacher: image embeddings against class text embeddings, as cosines.

The architecture is open_clip's (``VisionTransformer`` / ``TextTransformer``, QuickGELU for OpenAI weights,
the causal text mask and EOT pooling); this module only reads weights into it. Two layouts load, each
strictly (missing, unexpected and mis-shaped keys are named):

- **OpenAI** (the release ``.pt``: a TorchScript archive or a plain state dict; open_clip checkpoints of the
  same ViT family use the same keys): ``visual.*`` and, for the text tower, ``token_embedding.weight``,
  ``positional_embedding``, ``transformer.*``, ``ln_final.*``, ``text_projection``. Sizes come from the tensors
  as ``clip.build_model`` infers them (heads = width // 64); the JIT integer keys ``input_resolution``,
  ``context_length``, ``vocab_size`` are dropped. OpenAI weights were trained with QuickGELU (``quick_gelu=True``,
  the default); an open_clip checkpoint trained with GELU (e.g. LAION ViT-B-16) needs ``quick_gelu=False``.
- **Hugging Face** (``CLIPVisionModelWithProjection`` or ``CLIPModel``, with its config dict or the folder's
  ``config.json``): keys ``vision_model.*`` / ``visual_projection.weight`` (+ ``text_model.*``,
  ``text_projection.weight``, ``logit_scale``), mapped key by key onto open_clip's modules (q/k/v joined into
  ``in_proj``, projections transposed); sizes, heads, activation and LayerNorm eps come from the config.

Class text embeddings are either ``text_features`` (K, D) used as given (VLPL's files), or ``class_names``
formatted into ``prompt`` ("_" becomes " ", as AEVLP's PromptLearner does), tokenised by CLIP's BPE and run
through the text tower, optionally through a text adapter (AEVLP's GCN), then L2-normalised.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mlic.errors import MlicError

JIT_KEYS = ("input_resolution", "context_length", "vocab_size")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TeacherError(MlicError):
    """Teacher weights, text features or class names that cannot make a teacher; the message says why."""


def _open_clip():
    try:
        import open_clip  # noqa: F401
        from open_clip import model as oc_model
        from open_clip import tokenizer as oc_tokenizer
    except ImportError as err:  # pragma: no cover - the extra is in [dev]
        raise TeacherError("the CLIP teacher needs open_clip: pip install 'mlic[clip]'") from err
    return oc_model, oc_tokenizer


# ---------------------------------------------------------------------------------------------------------------
# reading weights


def read_weights(weights, config: Mapping | str | Path | None = None) -> tuple[dict, dict | None, str]:
    """The state dict (and HF config) behind ``weights``: a state dict, a ``.pt``/``.bin``/``.safetensors`` file
    (OpenAI release, JIT or not; open_clip checkpoint) or a Hugging Face folder with ``config.json``.

    Returns ``(state_dict, config or None, where)`` with ``where`` naming the source for messages.
    """
    where = "the given state dict"
    if isinstance(config, (str, Path)):
        config = json.loads(Path(config).read_text())
    if isinstance(weights, Mapping):
        state = dict(weights)
    else:
        path = Path(weights)
        where = str(path)
        if path.is_dir():
            cfg_file = path / "config.json"
            files = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
            if not files:
                raise TeacherError(f"{path}: a Hugging Face CLIP folder needs model.safetensors or pytorch_model.bin")
            if config is None:
                if not cfg_file.is_file():
                    raise TeacherError(f"{path}: a Hugging Face CLIP folder needs its config.json")
                config = json.loads(cfg_file.read_text())
            state = _read_file(files[0])
        elif path.is_file():
            state = _read_file(path)
        else:
            raise TeacherError(f"teacher weights {path}: no such file or folder")
    for wrapper in ("state_dict", "model"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = dict(state[wrapper])
    state = {_strip_prefix(k): v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TeacherError(f"{where}: entries {bad[:3]} are not tensors; expected a CLIP state dict")
    return state, (dict(config) if config is not None else None), where


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _read_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:  # an OpenAI release is a TorchScript archive: only its tensors are taken
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    except (RuntimeError, ValueError):
        pass
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise TeacherError(f"{path}: not a CLIP checkpoint (neither a TorchScript archive nor a state dict: "
                           f"{str(err).splitlines()[0][:120]})") from None
    if not isinstance(state, Mapping):
        raise TeacherError(f"{path}: holds a {type(state).__name__}, expected a CLIP state dict")
    return dict(state)


def detect_layout(state: Mapping) -> str:
    """"openai" or "hf" from the keys; anything else is one clear error."""
    if "visual.conv1.weight" in state or "visual.proj" in state:
        return "openai"
    if any(k.startswith("vision_model.") for k in state):
        return "hf"
    if any(k.startswith("visual.layer1.") for k in state):
        raise TeacherError("teacher weights hold a ResNet CLIP (visual.layer1.*): only ViT CLIP towers are supported")
    sample = ", ".join(sorted(state)[:3]) or "no keys"
    raise TeacherError(f"teacher weights are of neither CLIP layout (OpenAI 'visual.conv1.weight' / Hugging Face "
                       f"'vision_model.*'); found {sample}")


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face layout -> open_clip's module keys

_HF_BLOCK = {"self_attn.out_proj.weight": "attn.out_proj.weight", "self_attn.out_proj.bias": "attn.out_proj.bias",
             "layer_norm1.weight": "ln_1.weight", "layer_norm1.bias": "ln_1.bias",
             "layer_norm2.weight": "ln_2.weight", "layer_norm2.bias": "ln_2.bias",
             "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
             "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias"}


def _hf_configs(config: Mapping | None) -> tuple[dict, dict | None, int | None]:
    """(vision config, text config or None, projection dim) of an HF ``CLIPVisionConfig`` / ``CLIPConfig`` dict."""
    if config is None:
        raise TeacherError("Hugging Face CLIP weights need their config (config.json or config=...)")
    if "vision_config" in config:
        return dict(config["vision_config"]), dict(config.get("text_config") or {}), config.get("projection_dim")
    if config.get("model_type", "clip_vision_model") != "clip_vision_model" or "hidden_size" not in config:
        raise TeacherError(f"teacher config of model_type {config.get('model_type')!r}: expected a CLIPConfig or "
                           "CLIPVisionConfig dict")
    return dict(config), None, config.get("projection_dim")


def _hf_expected(prefix: str, cfg: Mapping, tower: str) -> dict[str, tuple]:
    """HF keys and shapes of one tower (``tower`` "vision" or "text")."""
    d, m, n = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"])
    keys: dict[str, tuple] = {}
    if tower == "vision":
        p, s = int(cfg["patch_size"]), int(cfg["image_size"])
        keys.update({f"{prefix}embeddings.class_embedding": (d,),
                     f"{prefix}embeddings.patch_embedding.weight": (d, int(cfg.get("num_channels", 3)), p, p),
                     f"{prefix}embeddings.position_embedding.weight": ((s // p) ** 2 + 1, d),
                     f"{prefix}pre_layrnorm.weight": (d,), f"{prefix}pre_layrnorm.bias": (d,),
                     f"{prefix}post_layernorm.weight": (d,), f"{prefix}post_layernorm.bias": (d,)})
    else:
        keys.update({f"{prefix}embeddings.token_embedding.weight": (int(cfg["vocab_size"]), d),
                     f"{prefix}embeddings.position_embedding.weight": (int(cfg["max_position_embeddings"]), d),
                     f"{prefix}final_layer_norm.weight": (d,), f"{prefix}final_layer_norm.bias": (d,)})
    for i in range(n):
        b = f"{prefix}encoder.layers.{i}."
        for x in "qkv":
            keys[f"{b}self_attn.{x}_proj.weight"], keys[f"{b}self_attn.{x}_proj.bias"] = (d, d), (d,)
        keys.update({f"{b}self_attn.out_proj.weight": (d, d), f"{b}self_attn.out_proj.bias": (d,),
                     f"{b}layer_norm1.weight": (d,), f"{b}layer_norm1.bias": (d,),
                     f"{b}layer_norm2.weight": (d,), f"{b}layer_norm2.bias": (d,),
                     f"{b}mlp.fc1.weight": (m, d), f"{b}mlp.fc1.bias": (m,),
                     f"{b}mlp.fc2.weight": (d, m), f"{b}mlp.fc2.bias": (d,)})
    return keys


def _hf_map_tower(state: Mapping, prefix: str, layers: int, out: str) -> dict:
    """open_clip keys (under ``out``) of one HF tower; the caller has checked every key and shape."""
    mapped = {}
    for i in range(layers):
        b, o = f"{prefix}encoder.layers.{i}.", f"{out}transformer.resblocks.{i}."
        mapped[o + "attn.in_proj_weight"] = torch.cat([state[f"{b}self_attn.{x}_proj.weight"] for x in "qkv"])
        mapped[o + "attn.in_proj_bias"] = torch.cat([state[f"{b}self_attn.{x}_proj.bias"] for x in "qkv"])
        for hf, oc in _HF_BLOCK.items():
            mapped[o + oc] = state[b + hf]
    return mapped


def _check_keys(state: Mapping, expected: Mapping[str, tuple], where: str, ignored: Sequence[str] = ()) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if k not in ignored)
    shaped = sorted(f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})" for k in set(expected) & set(state)
                    if tuple(state[k].shape) != tuple(expected[k]))
    problems = [f"missing {', '.join(missing[:6])}{' …' if len(missing) > 6 else ''}" if missing else "",
                f"unexpected {', '.join(unexpected[:6])}{' …' if len(unexpected) > 6 else ''}" if unexpected else "",
                f"mis-shaped {', '.join(shaped[:4])}" if shaped else ""]
    problems = [p for p in problems if p]
    if problems:
        raise TeacherError(f"{where}: CLIP weights do not load strictly: {'; '.join(problems)}")


# ---------------------------------------------------------------------------------------------------------------
# the towers


class ClipTowers(nn.Module):
    """open_clip's vision tower and (optional) text tower with weights of either layout, loaded strictly.

    Attributes:
        visual: open_clip ``VisionTransformer``; ``visual(x)`` (B, 3, S, S) -> (B, D) projected embeddings.
        text: open_clip ``TextTransformer`` or None; ``text(tokens)`` (K, L) -> (K, D).
        logit_scale_raw: the checkpoint's raw ``logit_scale`` (ln 100 for OpenAI) or NaN when absent.
        layout: "openai" or "hf"; image_size, embed_dim, context_length (None without a text tower).
    """

    def __init__(self, state: Mapping, config: Mapping | None = None, quick_gelu: bool | None = None,
                 where: str = "the given state dict") -> None:
        super().__init__()
        oc_model, _ = _open_clip()
        self.layout = detect_layout(state)
        if self.layout == "openai":
            vision_cfg, text_cfg, embed_dim, mapped = self._openai(state, where)
            quick_gelu = True if quick_gelu is None else quick_gelu
        else:
            vision_cfg, text_cfg, embed_dim, mapped, act = self._hf(state, config, where)
            quick_gelu = act if quick_gelu is None else quick_gelu
        self.visual = oc_model._build_vision_tower(embed_dim, vision_cfg, quick_gelu)
        self.text = oc_model._build_text_tower(embed_dim, text_cfg, quick_gelu) if text_cfg is not None else None
        raw = mapped.pop("logit_scale", None)
        self.register_buffer("logit_scale_raw", torch.tensor(math.nan) if raw is None else raw.detach().float())
        own = {k: v for k, v in self.state_dict().items() if k != "logit_scale_raw"}
        _check_keys(mapped, {k: tuple(v.shape) for k, v in own.items()}, where)
        self.load_state_dict({**{k: v.float() for k, v in mapped.items()}, "logit_scale_raw": self.logit_scale_raw})
        self.image_size = int(vision_cfg.image_size)
        self.embed_dim = int(embed_dim)
        self.context_length = int(text_cfg.context_length) if text_cfg is not None else None

    @staticmethod
    def _openai(state: Mapping, where: str):
        oc_model, _ = _open_clip()
        # JIT archives carry integer attributes and the causal mask (rebuilt by open_clip): not weights
        state = {k: v for k, v in state.items() if k not in JIT_KEYS and k != "attn_mask"}
        for key in ("visual.conv1.weight", "visual.positional_embedding", "visual.proj"):
            if key not in state:
                raise TeacherError(f"{where}: CLIP weights do not load strictly: missing {key}")
        width, patch = state["visual.conv1.weight"].shape[0], state["visual.conv1.weight"].shape[-1]
        layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
        fc = state.get("visual.transformer.resblocks.0.mlp.c_fc.weight")
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision_cfg = oc_model.CLIPVisionCfg(layers=layers, width=width, patch_size=patch, image_size=patch * grid,
                                            mlp_ratio=(fc.shape[0] / width) if fc is not None else 4.0)
        embed_dim = state["visual.proj"].shape[1]
        text_keys = [k for k in state if not k.startswith("visual.") and k != "logit_scale"]
        text_cfg = None
        if text_keys:
            for key in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection"):
                if key not in state:
                    raise TeacherError(f"{where}: CLIP weights do not load strictly: missing {key}")
            twidth = state["ln_final.weight"].shape[0]
            tfc = state.get("transformer.resblocks.0.mlp.c_fc.weight")
            text_cfg = oc_model.CLIPTextCfg(
                context_length=state["positional_embedding"].shape[0],
                vocab_size=state["token_embedding.weight"].shape[0],
                width=twidth, heads=twidth // 64,
                layers=len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}),
                mlp_ratio=(tfc.shape[0] / twidth) if tfc is not None else 4.0)
            embed_dim = state["text_projection"].shape[1] if state["text_projection"].ndim == 2 else embed_dim
        mapped = {}
        for k, v in state.items():
            mapped[k if k.startswith("visual.") or k == "logit_scale" else "text." + k] = v
        return vision_cfg, text_cfg, embed_dim, mapped

    @staticmethod
    def _hf(state: Mapping, config: Mapping | None, where: str):
        oc_model, _ = _open_clip()
        vcfg, tcfg, proj_dim = _hf_configs(config)
        has_text = any(k.startswith("text_model.") for k in state)
        expected = _hf_expected("vision_model.", vcfg, "vision")
        expected["visual_projection.weight"] = (int(proj_dim or vcfg.get("projection_dim")), int(vcfg["hidden_size"]))
        if has_text:
            if not tcfg:
                raise TeacherError(f"{where}: the weights hold a text tower (text_model.*) but the config has no "
                                   "text_config")
            expected.update(_hf_expected("text_model.", tcfg, "text"))
            expected["text_projection.weight"] = (expected["visual_projection.weight"][0], int(tcfg["hidden_size"]))
            expected["logit_scale"] = ()
        ignored = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")
        _check_keys(state, expected, where, ignored)
        acts = {vcfg.get("hidden_act", "quick_gelu")} | ({tcfg.get("hidden_act", "quick_gelu")} if has_text else set())
        if not acts <= {"quick_gelu", "gelu"} or len(acts) > 1:
            raise TeacherError(f"{where}: hidden_act {sorted(acts)} is not supported (quick_gelu or gelu)")

        def tower_cfg(cfg, kind):
            d = int(cfg["hidden_size"])
            common = dict(width=d, layers=int(cfg["num_hidden_layers"]), mlp_ratio=int(cfg["intermediate_size"]) / d,
                          norm_kwargs={"eps": float(cfg.get("layer_norm_eps", 1e-5))})
            if kind == "vision":
                return oc_model.CLIPVisionCfg(patch_size=int(cfg["patch_size"]), image_size=int(cfg["image_size"]),
                                              head_width=d // int(cfg["num_attention_heads"]), **common)
            return oc_model.CLIPTextCfg(context_length=int(cfg["max_position_embeddings"]),
                                        vocab_size=int(cfg["vocab_size"]), heads=int(cfg["num_attention_heads"]),
                                        **common)

        v = "vision_model."
        mapped = {"visual.class_embedding": state[v + "embeddings.class_embedding"],
                  "visual.conv1.weight": state[v + "embeddings.patch_embedding.weight"],
                  "visual.positional_embedding": state[v + "embeddings.position_embedding.weight"],
                  "visual.ln_pre.weight": state[v + "pre_layrnorm.weight"],
                  "visual.ln_pre.bias": state[v + "pre_layrnorm.bias"],
                  "visual.ln_post.weight": state[v + "post_layernorm.weight"],
                  "visual.ln_post.bias": state[v + "post_layernorm.bias"],
                  "visual.proj": state["visual_projection.weight"].t().contiguous()}
        mapped.update(_hf_map_tower(state, v, int(vcfg["num_hidden_layers"]), "visual."))
        text_cfg = None
        if has_text:
            t = "text_model."
            mapped.update({"text.token_embedding.weight": state[t + "embeddings.token_embedding.weight"],
                           "text.positional_embedding": state[t + "embeddings.position_embedding.weight"],
                           "text.ln_final.weight": state[t + "final_layer_norm.weight"],
                           "text.ln_final.bias": state[t + "final_layer_norm.bias"],
                           "text.text_projection": state["text_projection.weight"].t().contiguous(),
                           "logit_scale": state["logit_scale"]})
            mapped.update(_hf_map_tower(state, t, int(tcfg["num_hidden_layers"]), "text."))
            text_cfg = tower_cfg(tcfg, "text")
        return tower_cfg(vcfg, "vision"), text_cfg, expected["visual_projection.weight"][0], mapped, \
            acts == {"quick_gelu"}


# ---------------------------------------------------------------------------------------------------------------
# prompts


def format_prompts(class_names: Sequence[str], prompt: str = "a photo of a {}.") -> list[str]:
    """One prompt per class: "_" -> " " in the name and the template (AEVLP's PromptLearner), then formatted."""
    if "{}" not in prompt:
        raise TeacherError(f"prompt template {prompt!r} has no '{{}}' where the class name goes")
    template = prompt.replace("_", " ")
    return [template.replace("{}", str(name).replace("_", " "), 1) for name in class_names]


def tokenize_prompts(class_names: Sequence[str], prompts: Sequence[str], context_length: int) -> torch.Tensor:
    """CLIP BPE token ids (K, context_length), SOT/EOT and zero padding; a prompt too long names its class."""
    _, oc_tokenizer = _open_clip()
    tok = oc_tokenizer._tokenizer
    rows = []
    for name, text in zip(class_names, prompts):
        ids = [tok.sot_token_id, *tok.encode(text), tok.eot_token_id]
        if len(ids) > context_length:
            raise TeacherError(f"class {name!r}: its prompt {text!r} is {len(ids)} tokens, beyond the text tower's "
                               f"context length {context_length}; shorten the class name or the prompt template")
        rows.append(ids + [0] * (context_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------
# AEVLP's text adapter


def aevlp_relation(relation: torch.Tensor, sparse_topk: int, reweight_p: float) -> torch.Tensor:
    """AEVLP's ``get_relation``: per row the ``sparse_topk`` largest (the diagonal among them), diagonal zeroed,
    rows rescaled to sum ``reweight_p``, diagonal ``1 - reweight_p``. (K, K) float32."""
    rel = torch.as_tensor(relation, dtype=torch.float32).clone()
    if rel.ndim != 2 or rel.shape[0] != rel.shape[1]:
        raise TeacherError(f"AEVLP relation must be a square (K, K) matrix, got {tuple(rel.shape)}")
    k = min(int(sparse_topk), rel.shape[1])
    values, idx = torch.topk(rel, k, dim=1)
    sparse = torch.zeros_like(rel).scatter_(1, idx, values)
    eye = torch.eye(rel.shape[0], dtype=torch.bool)
    sparse = sparse.masked_fill(eye, 0.0)
    sparse = sparse / sparse.sum(dim=1, keepdim=True) * reweight_p
    return sparse.masked_fill(eye, 1.0 - reweight_p)


class AevlpGCN(nn.Module):
    """AEVLP's residual 3-layer GCN on the class text features: ``t + A·(lrelu(A·(lrelu(A·t W1)) W2)) W3``.

    Weights use the official (in, out) layout. ``weights=None`` draws the official init ``U(±1/√out)`` in fp16
    from ``seed`` (the official draw is unseeded: every run differs); ``dtype`` float32 computes in float32 from
    the fp16 values, float16 as the official module.
    """

    sizes = ((512, 1024), (1024, 1024), (1024, 512))

    def __init__(self, relation: torch.Tensor, sparse_topk: int, reweight_p: float,
                 weights: Mapping[str, torch.Tensor] | None = None, seed: int | None = 0,
                 embed_dim: int = 512) -> None:
        super().__init__()
        if embed_dim != 512:
            raise TeacherError(f"AEVLP's GCN is sized for 512-wide text features (ViT-B/16, ViT-B/32); this CLIP's "
                               f"are {embed_dim}: use text_adapter=None")
        self.register_buffer("adj", aevlp_relation(relation, sparse_topk, reweight_p))
        if weights is None:
            gen = torch.Generator().manual_seed(int(seed or 0))
            weights = {f"gc{i + 1}.weight": (torch.rand(shape, generator=gen) * 2 - 1).mul(1 / math.sqrt(shape[1]))
                       .half() for i, shape in enumerate(self.sizes)}
        for i, shape in enumerate(self.sizes):
            key = f"gc{i + 1}.weight"
            if key not in weights:
                raise TeacherError(f"AEVLP GCN weights: missing {key}")
            if tuple(weights[key].shape) != shape:
                raise TeacherError(f"AEVLP GCN weights: {key} has shape {tuple(weights[key].shape)}, expected {shape}")
        extra = sorted(set(weights) - {f"gc{i + 1}.weight" for i in range(3)})
        if extra:
            raise TeacherError(f"AEVLP GCN weights: unexpected {', '.join(extra)}")
        self.w1, self.w2, self.w3 = (nn.Parameter(weights[f"gc{i}.weight"].detach().float(), requires_grad=False)
                                     for i in (1, 2, 3))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] != self.adj.shape[0]:
            raise TeacherError(f"AEVLP relation is {tuple(self.adj.shape)} but there are {t.shape[0]} classes")
        adj = self.adj.to(t.dtype)
        h = F.leaky_relu(adj @ (t @ self.w1.to(t.dtype)), 0.2)
        h = F.leaky_relu(adj @ (h @ self.w2.to(t.dtype)), 0.2)
        return adj @ (h @ self.w3.to(t.dtype)) + t


def build_text_adapter(spec: Mapping | None, embed_dim: int) -> nn.Module | None:
    """The text adapter named by ``spec["kind"]`` ("aevlp_gcn"), or None."""
    if spec is None:
        return None
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind != "aevlp_gcn":
        raise TeacherError(f"text_adapter kind {kind!r} is unknown; the one adapter is 'aevlp_gcn'")
    if "relation" not in spec:
        raise TeacherError("text_adapter 'aevlp_gcn' needs relation=<the (K, K) label relation matrix>")
    relation = spec.pop("relation")
    if isinstance(relation, (str, Path)):
        import numpy as np

        relation = torch.from_numpy(np.load(relation))
    try:
        return AevlpGCN(relation, embed_dim=embed_dim, **spec)
    except TypeError as err:
        raise TeacherError(f"text_adapter 'aevlp_gcn': {err}") from None


# ---------------------------------------------------------------------------------------------------------------
# the teacher


class ClipTeacher(nn.Module):
    """A frozen CLIP scoring K classes: ``teacher(x)`` (B, 3, S, S) preprocessed -> (B, K) float32 cosines.

    Built by ``build_teacher("clip", ...)``. Never trained: every parameter has ``requires_grad=False``, the
    forward runs under ``torch.no_grad`` in ``dtype`` (float32 by default), and ``train()`` is a no-op.

    Attributes:
        text_features: (K, D) buffer, the class embeddings the image embeddings are compared with.
        class_names: the K names, or None when ``text_features`` were given without names.
        image_size: the input side S the vision tower expects.
        logit_scale: ``exp`` of the checkpoint's raw logit scale (NaN without a text tower); unused by the rules.
    """

    kind = "clip"

    def __init__(self, weights, config: Mapping | str | Path | None = None, class_names: Sequence[str] | None = None,
                 prompt: str = "a photo of a {}.", text_features: torch.Tensor | None = None,
                 text_adapter: Mapping | None = None, quick_gelu: bool | None = None,
                 dtype: torch.dtype | str = torch.float32) -> None:
        super().__init__()
        state, config, where = read_weights(weights, config)
        self.towers = ClipTowers(state, config, quick_gelu, where)
        self.class_names = list(class_names) if class_names is not None else None
        self.prompt = prompt
        d = self.towers.embed_dim
        if text_features is not None:
            feats = torch.as_tensor(text_features).detach().float()
            if feats.ndim != 2 or feats.shape[1] != d:
                raise TeacherError(f"text_features have shape {tuple(feats.shape)}; this CLIP's image embeddings are "
                                   f"{d} wide: expected (K, {d})")
            if self.class_names is not None and feats.shape[0] != len(self.class_names):
                raise TeacherError(f"text_features have {feats.shape[0]} rows but there are {len(self.class_names)} "
                                   "classes: one row per class, in the data's class order")
            self.adapter = None
            self.register_buffer("text_features", feats)
        else:
            if self.class_names is None:
                raise TeacherError("a CLIP teacher needs class_names (through the text tower) or text_features (K, D)")
            if self.towers.text is None:
                raise TeacherError(f"{where}: this CLIP has no text tower (no token_embedding / text_model weights) "
                                   "and no text_features were given: pass text_features=<(K, D) class embeddings> or "
                                   "weights with the text tower")
            prompts = format_prompts(self.class_names, prompt)
            self.register_buffer("tokens", tokenize_prompts(self.class_names, prompts, self.towers.context_length))
            self.prompts = prompts
            self.adapter = build_text_adapter(text_adapter, d)
            with torch.no_grad():
                feats = self.towers.text(self.tokens)
                if self.adapter is not None:
                    feats = self.adapter(feats)
            self.register_buffer("text_features", F.normalize(feats, dim=-1))
        self.requires_grad_(False)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.to(self.dtype)
        self.text_features.data = self.text_features.data.float()
        self.image_size = self.towers.image_size
        self.eval()

    @property
    def num_classes(self) -> int:
        return int(self.text_features.shape[0])

    @property
    def logit_scale(self) -> float:
        return float(self.towers.logit_scale_raw.float().exp())

    def train(self, mode: bool = True) -> ClipTeacher:  # frozen: always in eval mode
        return super().train(False)

    @torch.no_grad()
    def image_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (B, D) in float32 of preprocessed images (B, 3, S, S)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise TeacherError(f"teacher input must be (B, 3, S, S) images, got {tuple(x.shape)}")
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise TeacherError(f"teacher input is {tuple(x.shape[-2:])}; this CLIP takes {self.image_size}x"
                               f"{self.image_size} (use its view maker, mlic.teachers.views)")
        feats = self.towers.visual(x.to(self.dtype)).float()
        return F.normalize(feats, dim=-1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cosines (B, K) float32: normalised image embeddings @ ``text_features``.T (text features as held)."""
        return self.image_embeddings(x) @ self.text_features.to(x.device).T


def hf_config_from_dict(config: Mapping) -> dict:
    """The HF config as a plain dict (a transformers config object's ``to_dict()`` too)."""
    return dict(config.to_dict() if hasattr(config, "to_dict") else config)

