// Stands in for the proxy dashboard's src/lib/auth.tsx: a signed-in session.
type Listener = () => void;
const listeners: Record<string, Listener[]> = {};
export const authService = {
    isAuthenticated: (): boolean => true,
    on(event: string, listener: Listener): void {
        (listeners[event] ||= []).push(listener);
    },
};
