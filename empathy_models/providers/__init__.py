"""
Model providers over aiohttp: `AnthropicProvider` (Messages API) and `OpenAIProvider`
(Chat Completions, any compatible server through ``base_url``).

Both share one session per executor (lent through ``bind``) or open their own under
``async with``, and map every wire failure once into the error tree (see
``empathy_models.providers._http`` for the table).
"""

from __future__ import annotations

from .anthropic import ANTHROPIC_VERSION, AnthropicProvider
from .openai import OpenAIProvider

__all__ = ["ANTHROPIC_VERSION", "AnthropicProvider", "OpenAIProvider"]
