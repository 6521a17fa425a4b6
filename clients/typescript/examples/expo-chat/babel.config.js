// What Expo uses by default; written out so that Jest (React Native's preset) transforms with it too.
module.exports = function (api) {
  api.cache(true);
  return { presets: ['babel-preset-expo'] };
};
