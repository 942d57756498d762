"""The web UI (``diffswap-igfi ui``): a Gradio app over the Swapper and the video swap, with
named API endpoints.

``service`` (photos) and ``video`` (videos) do the work without Gradio; ``app`` lays out the
tabs (``video_tab`` the Video tab, ``controls`` the pieces they share) and wires their events;
``server`` parses the command's options, guards the host, and owns the temporary folder.
"""
