"""Optional serving extras (`pip install 'vpt_fast[serve]'`): the OpenAI-compatible app
(`app.build_app`) and `vpt-fast serve` (`server.serve`). The core package never imports them."""
