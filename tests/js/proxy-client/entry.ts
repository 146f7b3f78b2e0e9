// Loads the proxy's client unchanged (it connects on import) and exposes it to the test.
import { wsClient } from './websocket-client';
(globalThis as any).wsClient = wsClient;
