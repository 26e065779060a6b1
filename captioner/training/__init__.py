"""Training: preparing every cache a run needs (prepare), the LightningModule (module), SCST (scst), CUDA-graphed
steps (graphs) and the callbacks (monitor, history, interrupt, sweep). Imports only the layers below it."""
