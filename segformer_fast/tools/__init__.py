"""The tools built on the library: the ``segformer-fast`` command (:mod:`.cli`), the end-to-end
benchmark (:mod:`.benchmark`), the saved-activation memory report (:mod:`.memory_report`) and ONNX
export (:mod:`.export`). Nothing in the library imports from here."""
