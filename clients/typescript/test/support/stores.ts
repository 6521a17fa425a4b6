/** A store for tests that stands for a persistent one: in memory, but shared by the clients of one test. */

import { MemoryStorage } from '@llmrouter/client';

export class PersistentMemory extends MemoryStorage {
  override readonly persistent: boolean = true;
}
