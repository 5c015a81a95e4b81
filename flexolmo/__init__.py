"""flexolmo: the model side of flexolmo-trace.

Sources and the workspace they live in, the shared tokenizer, the public model, expert
training (optionally with differential privacy), merging, opt-in/opt-out and generation
with routing capture. `index/` and `tracing/` build on this package; it never imports them.
"""
