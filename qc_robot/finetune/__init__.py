"""Online fine-tuning on hardware: a learner fed by the control server's learner port.

``client`` (the link to the server), ``episodes`` (records → whole episodes), ``loop``
(``run_finetune``), ``config`` (``FinetuneConfig``). See docs/finetune.md.
"""
