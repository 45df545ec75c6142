"""What every job runs on: run records and locks (`runs`), processes and ranks
(`distributed`), the stop event (`stopping`), progress events (`progress`), experiment
tracking (`tracking`), seeds (`seeds`), speed settings (`fastpath`) and the checked fastai/torch
internals (`adapters`)."""
