"""vmclient: the asyncio client library and console for vmserver (protocol v1). Not written yet."""
