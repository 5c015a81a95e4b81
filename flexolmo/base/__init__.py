"""The base layer every other package may import, and which imports none of them.

The workspace and its folders, the project's errors, the DuckDB catalog of sources and their
policies, reading users' documents and building the sample federation, the shared tokenizer
(trained, or imported from a Hugging Face folder), each source's token cache, and the card
every artifact carries (`artifacts/`).
"""
