// Metro as a bare React Native app runs it: @react-native/metro-config's defaults (the
// template's metro.config.js), package exports as the RN version has them unless the second
// argument says on or off. Usage: node metro-bare.cjs <platform> <default|exports|no-exports> <out>
const path = require('node:path');
const Metro = require('metro');
const { getDefaultConfig, mergeConfig } = require('@react-native/metro-config');

const [platform, exportsMode, out] = process.argv.slice(2);
const root = process.cwd();
const resolver = exportsMode === 'default' ? {} : { unstable_enablePackageExports: exportsMode === 'exports' };
// (loadConfig adds Metro's own defaults under React Native's, as the react-native CLI does)
Metro.loadConfig({ cwd: root }, mergeConfig(getDefaultConfig(root), { resolver }))
  .then((config) => {
    console.log(`metro ${require('metro/package.json').version}, package exports ${config.resolver.unstable_enablePackageExports ? 'on' : 'off'}`);
    return Metro.runBuild(config, { entry: path.join(root, 'index.bare.tsx'), platform, out, dev: false, minify: false });
  })
  .then(
  () => process.exit(0),
  (e) => {
    console.error(e);
    process.exit(1);
  },
);
