"""The web UI (``diffswap-igfi ui``): a Gradio app over the Swapper, with named API endpoints.

``service`` does the work without Gradio; ``app`` lays out the tabs and wires their events;
``server`` parses the command's options, guards the host, and owns the temporary folder.
"""
