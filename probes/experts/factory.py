"""Build the configured expert backend behind the one ``Expert`` interface."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from probes.config import Settings
from probes.errors import ConfigError
from probes.experts.base import Expert

if TYPE_CHECKING:
    from probes.runtime.manifest import BundleManifest


def build_expert(settings: Settings, *, bundle_manifest: BundleManifest | None = None) -> Expert:
    """``encoder-head`` needs a trained directory: ``expert.path``, else the one recorded in the bundle."""
    cfg = settings.expert
    if cfg.backend == "encoder-head":
        from probes.experts.encoder_head import EncoderHeadExpert

        path = cfg.path
        if path is None and bundle_manifest is not None and bundle_manifest.expert is not None:
            path = Path(bundle_manifest.expert.path)
        if path is None:
            raise ConfigError("encoder-head expert: set expert.path or use a bundle trained with `ctd-monitor train`")
        head = cfg.encoder_head
        return EncoderHeadExpert(path, device=head.device, dtype=head.dtype, max_windows=head.max_windows)
    if cfg.backend == "hf-guard":
        from probes.experts.hf_guard import HFGuardExpert

        return HFGuardExpert(cfg.hf_guard, cache_dir=settings.cache_dir)
    from probes.experts.openai_compatible import OpenAICompatibleExpert

    o = cfg.openai
    return OpenAICompatibleExpert(o, api=o.api, chat_messages=o.chat_messages,
                                  prompts_per_request=o.prompts_per_request, params_per_token=o.params_per_token)
