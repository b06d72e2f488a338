"""The playground: talk to the base and the tuned model side by side, read the evaluation, record judgements.

`finetune-operator playground TARGET` (TARGET: a FineTuneJob manifest run in local mode, an output folder, or a
stage workdir on a cluster's workspace volume) serves a Gradio app on localhost. Gradio is the optional
`playground` extra; `target` (what a TARGET holds) needs neither Gradio nor torch.
"""
