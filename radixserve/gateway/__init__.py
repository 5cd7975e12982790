"""The HTTP gateway process: aiohttp app (`app`, with its route table), its client of the tokenizer processes
(`tokenizer_client`), and the HTTP shapes of SGLang-native and OpenAI requests and answers (`native`,
`openai_api`, `responses_api` and their formats). What it shares with the offline Engine — the native request and
answer, the sampling checks, the SGLang field catalogue — is the floor's (`radixserve/native_api.py`,
`sampling_checks.py`, `sglang_fields.py`). Owns no model state."""
