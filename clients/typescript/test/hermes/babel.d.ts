/** The one call of @babel/core the Hermes test makes (Babel ships no types of its own). */
declare module '@babel/core' {
  export function transformFileSync(file: string, options: Record<string, unknown>): { code?: string | null } | null;
}
