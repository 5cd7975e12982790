"""The HTTP gateway process: aiohttp app (`app`), its client of the tokenizer processes
(`tokenizer_client`), SGLang-native and OpenAI request/response shapes (`native`, `openai_api`) and the
request validation they share (`validation`). Owns no model state."""
